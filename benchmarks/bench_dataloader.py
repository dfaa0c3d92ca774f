"""Data pipeline throughput: images/s of visiontune's training loader vs torchvision `ImageFolder`, no model.

A folder of photo-sized JPEGs (default 10 classes x 40 images of 480x360, smooth random content) is generated in a
temporary directory. visiontune's side is what training uses: `read_dataset(folder)` ->
`ImageClassificationDataset(..., train_transform(pre, preset="light"), max_pixels,
draft_size=pre.image_size)` with `Collator()`. torchvision's side is `ImageFolder(folder, transform=<the same
transform>)` with the default collate. Both use the same batch size, workers, shuffling and persistent workers.
For each target size the loaders are measured alternately (torchvision, ours, torchvision, ours, ...); the first
batch of every measurement (worker start-up) is not timed.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dataloader.py --batches 30 --rounds 2 --sizes 64 224
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from visiontune.classify.config import DataConfig
from visiontune.core.dataset import Collator, ImageClassificationDataset
from visiontune.core.readers import read_dataset
from visiontune.core.transforms import Preprocess, train_transform

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
    dataset = ImageFolder(str(root), transform=train_transform(pre, preset="light"))
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


def images_per_second(loader: DataLoader, batches: int) -> float:
    """Throughput over `batches` batches after the first (which includes worker start-up); epochs repeat."""
    seen, count, start = 0, 0, 0.0
    while count <= batches:
        for batch in loader:
            if count == 0:
                start = time.perf_counter()
            else:
                seen += batch_size_of(batch)
            count += 1
            if count > batches:
                break
    return seen / (time.perf_counter() - start)


def measure(root: Path, size: int, rounds: int, batches: int, batch_size: int, workers: int) -> tuple[float, float]:
    pre = Preprocess(size, MEAN_STD, MEAN_STD, "bicubic")
    theirs, ours = [], []
    for r in range(1, rounds + 1):
        torch.manual_seed(r)
        theirs.append(images_per_second(torchvision_loader(root, pre, batch_size, workers), batches))
        torch.manual_seed(r)
        ours.append(images_per_second(visiontune_loader(root, pre, batch_size, workers), batches))
        print(
            f"{size} px round {r}: torchvision {theirs[-1]:.1f} img/s  visiontune {ours[-1]:.1f} img/s  "
            f"ratio {ours[-1] / theirs[-1]:.3f}",
            flush=True,
        )
    return statistics.mean(theirs), statistics.mean(ours)


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
    for size, (theirs, ours) in results.items():
        print(
            f"{size} px mean: torchvision {theirs:.1f} img/s  visiontune {ours:.1f} img/s  "
            f"ratio ours/torchvision {ours / theirs:.3f} (target >= 1.0)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="target input sizes (px)")
    parser.add_argument("--rounds", type=int, default=2, help="torchvision/visiontune pairs, alternated")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40)
    args = parser.parse_args()
    main(args.sizes, args.rounds, args.batches, args.batch_size, args.workers, args.classes, args.per_class)
