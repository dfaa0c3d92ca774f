"""Data pipeline throughput: images/s of visiontune's training loader vs torchvision `ImageFolder`, no model.

A folder of photo-sized JPEGs (default 10 classes x 40 images of 480x360, smooth random content) is generated in a
temporary directory. visiontune's side is what training uses: `read_dataset(folder)` ->
`ImageClassificationDataset(..., train_transform(pre, preset="light"), max_pixels, draft_size=pre.image_size)` with
`Collator()`. torchvision's side is `ImageFolder(folder, transform=<the same steps without visiontune's own
`Contiguous`>)` with the default collate. Both use the same batch size, workers, shuffling and persistent workers.
For each target size the loaders are measured alternately (torchvision, ours, torchvision, ours, ...; the side that
goes first alternates too); the first batch of every measurement (worker start-up) is not timed. Each measurement
reports images per wall second and CPU milliseconds per image (this process plus its loader workers, from psutil);
the ratios are per round (ours / torchvision, so > 1 is better for us in both), then their median: on a shared
machine, background load hits both sides of a round alike.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dataloader.py --batches 30 --rounds 5 --sizes 64 224
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from visiontune.classify.config import DataConfig
from visiontune.core.dataset import Collator, ImageClassificationDataset
from visiontune.core.readers import read_dataset
from visiontune.core.transforms import Contiguous, Preprocess, train_transform

MAX_PIXELS = DataConfig.model_fields["max_image_pixels"].default
MEAN_STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite0's normalisation; the value does not change the cost


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Low-frequency random colours upsampled to full size, plus mild grain: compresses like a photo."""
    coarse = rng.integers(0, 256, size=(height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-8, 9, size=img.shape, dtype=np.int16)
    return Image.fromarray(np.clip(img + grain, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, classes: int, per_class: int, width: int, height: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            smooth_image(rng, width, height).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def visiontune_loader(root: Path, pre: Preprocess, batch_size: int, workers: int) -> DataLoader:
    data = read_dataset(str(root))
    transform = train_transform(pre, preset="light")
    dataset = ImageClassificationDataset(data, transform, MAX_PIXELS, draft_size=pre.image_size)
    return make_loader(dataset, batch_size, workers, Collator())


def torchvision_loader(root: Path, pre: Preprocess, batch_size: int, workers: int) -> DataLoader:
    # torchvision's own steps as its users write them: the preset's crop, flip, ToImage, ToDtype, Normalize, without
    # visiontune's `Contiguous` (which is ours, not torchvision's)
    steps = [t for t in train_transform(pre, preset="light").transforms if not isinstance(t, Contiguous)]
    dataset = ImageFolder(str(root), transform=v2.Compose(steps))
    return make_loader(dataset, batch_size, workers, None)


def make_loader(dataset: Dataset, batch_size: int, workers: int, collate_fn) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_fn,
        persistent_workers=workers > 0,
    )


def batch_size_of(batch) -> int:
    return int(batch["pixel_values"].shape[0] if isinstance(batch, dict) else batch[0].shape[0])


def cpu_by_process() -> dict[int, float]:
    """CPU seconds (user + system) of this process and each of its children (the loader workers), by pid."""
    me = psutil.Process(os.getpid())
    times = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        times[proc.pid] = t.user + t.system
    return times


def throughput(loader: DataLoader, batches: int) -> tuple[float, float]:
    """Images per wall second and CPU ms per image over `batches` batches after the first (which includes worker
    start-up); epochs repeat."""
    seen, count, start, cpu = 0, 0, 0.0, {}
    while count <= batches:
        for batch in loader:
            if count == 0:
                start, cpu = time.perf_counter(), cpu_by_process()
            else:
                seen += batch_size_of(batch)
            count += 1
            if count > batches:
                break
    wall = time.perf_counter() - start
    used = sum(t - cpu.get(pid, 0.0) for pid, t in cpu_by_process().items())
    return seen / wall, used / seen * 1e3


def measure(root: Path, size: int, rounds: int, batches: int, batch_size: int, workers: int) -> dict[str, float]:
    pre = Preprocess(size, MEAN_STD, MEAN_STD, "bicubic")
    sides = {"torchvision": torchvision_loader, "visiontune": visiontune_loader}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for r in range(1, rounds + 1):
        order = list(sides) if r % 2 else list(sides)[::-1]
        for name in order:
            torch.manual_seed(r)
            loader = sides[name](root, pre, batch_size, workers)
            runs[name].append(throughput(loader, batches))
            del loader
            gc.collect()  # persistent workers exit before the next measurement starts
        (tv_ips, tv_ms), (vt_ips, vt_ms) = runs["torchvision"][-1], runs["visiontune"][-1]
        print(
            f"{size} px round {r}: torchvision {tv_ips:.1f} img/s {tv_ms:.2f} CPU-ms/img  visiontune {vt_ips:.1f} "
            f"img/s {vt_ms:.2f} CPU-ms/img  ratio wall {vt_ips / tv_ips:.3f} CPU {tv_ms / vt_ms:.3f}",
            flush=True,
        )
    pairs = list(zip(runs["torchvision"], runs["visiontune"], strict=True))
    return {
        "torchvision_ips": statistics.median(t[0] for t, _ in pairs),
        "visiontune_ips": statistics.median(v[0] for _, v in pairs),
        "torchvision_ms": statistics.median(t[1] for t, _ in pairs),
        "visiontune_ms": statistics.median(v[1] for _, v in pairs),
        "wall_ratio": statistics.median(v[0] / t[0] for t, v in pairs),
        "cpu_ratio": statistics.median(t[1] / v[1] for t, v in pairs),
    }


def main(
    sizes: list[int], rounds: int, batches: int, batch_size: int, workers: int, classes: int, per_class: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="vt-bench-data-") as tmp:
        root = make_image_folder(Path(tmp) / "images", classes, per_class, 480, 360)
        print(
            f"torch {torch.__version__}; {classes} x {per_class} JPEGs of 480x360; batch {batch_size}, "
            f"{workers} workers, {batches} timed batches, {rounds} rounds"
        )
        results = {size: measure(root, size, rounds, batches, batch_size, workers) for size in sizes}
    for size, m in results.items():
        print(
            f"{size} px medians: torchvision {m['torchvision_ips']:.1f} img/s {m['torchvision_ms']:.2f} CPU-ms/img, "
            f"visiontune {m['visiontune_ips']:.1f} img/s {m['visiontune_ms']:.2f} CPU-ms/img; ours/torchvision "
            f"(median of per-round ratios): wall {m['wall_ratio']:.3f}, CPU {m['cpu_ratio']:.3f} (target >= 1.0)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="target input sizes (px)")
    parser.add_argument("--rounds", type=int, default=5, help="torchvision/visiontune pairs, alternated")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40)
    args = parser.parse_args()
    main(args.sizes, args.rounds, args.batches, args.batch_size, args.workers, args.classes, args.per_class)
