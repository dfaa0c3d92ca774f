"""Segmentation overhead: seconds per optimiser step of visiontune's `task: segment` training path vs a plain PyTorch
training loop on the same segmenter and data.

Both sides train the built-in recipe's model (`mnist-fpn-lite0`: the FPN decoder on the real EfficientNet-Lite0,
128 px, batch 16) on the same `builtin:mnist-segment` canvases with the same mask-aware transforms and
`SegmentationDataset`, AdamW (decay / no-decay groups), data loading in the main process (workers 0). visiontune's
trainer is built as `visiontune train` builds it (recipe -> `load_split` -> `SegmentTask().build` -> the runner's
`make_trainer`: the `Segmenter` wrapper, the Trainer loop); a callback timestamps every `on_step_end`. The baseline
is the decoder module itself: stacked batches from the dataset's collate, normalised, logits resized to the masks,
`F.cross_entropy(ignore_index=255)`, backward, AdamW step. The two are measured alternately in one process; the
first `--warmup` steps of each measurement are not timed. Wall and process-CPU time per step are both reported.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_segment.py --steps 20 --rounds 2 [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_overhead import Stamp, StepClock, forever, param_groups, report, stamp, step_times  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812

from visiontune.recipe import find_recipe, load_recipe  # noqa: E402
from visiontune.run.runner import make_trainer  # noqa: E402
from visiontune.segment.config import SegmentConfig  # noqa: E402
from visiontune.segment.dataset import SegmentationDataset, segmentation_collate  # noqa: E402
from visiontune.segment.model import soft_dice_loss  # noqa: E402
from visiontune.segment.task import SegmentData, SegmentTask, load_split  # noqa: E402
from visiontune.segment.transforms import segmentation_transforms  # noqa: E402

RECIPE = find_recipe("mnist-fpn-lite0")
TRAIN = "builtin:mnist-segment:512"  # a subset of the recipe's canvases: reading all 2,000 only slows the start


def recipe(run_dir: Path, total_steps: int) -> SegmentConfig:
    overrides = [
        f"output_dir={run_dir}",
        f"data.train={TRAIN}",
        "data.val=builtin:mnist-segment-heldout:16",
        "data.workers=0",
        f"train.max_steps={total_steps}",
        "train.eval_steps=100000",
    ]
    return load_recipe(RECIPE, overrides)


def run_baseline(cfg: SegmentConfig, data: SegmentData, total_steps: int, warmup: int) -> list[Stamp]:
    """Plain PyTorch: DataLoader (stacked) -> decoder(normalised pixels) -> resize -> the recipe's loss -> AdamW."""
    with tempfile.TemporaryDirectory(prefix="vt-bench-") as tmp:
        model = SegmentTask().build(cfg, data, Path(tmp)).model  # the same seeded segmenter
    net = model.net.train()
    mean, std = model.mean, model.std
    d, train = cfg.data, cfg.train
    transform = segmentation_transforms(d.augment.preset, d.image_size, train=True, hflip=d.augment.hflip)
    dataset = SegmentationDataset(data.train, transform, d.max_image_pixels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train.batch_size, shuffle=True, num_workers=0, collate_fn=segmentation_collate
    )
    optimizer = torch.optim.AdamW(param_groups(net, train.weight_decay), lr=train.lr)
    stamps, batches = [], forever(loader)
    for _ in range(total_steps):
        batch = next(batches)
        logits = net((batch["pixel_values"] - mean) / std)
        logits = F.interpolate(logits, size=batch["labels"].shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, batch["labels"], ignore_index=d.ignore_index)
        if train.loss == "dice_ce":
            loss = loss + soft_dice_loss(logits, batch["labels"], d.ignore_index)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del batch, logits, loss
        stamps.append(stamp())
    return step_times(stamps, warmup)


def run_visiontune(data: SegmentData, total_steps: int, warmup: int) -> list[Stamp]:
    with tempfile.TemporaryDirectory(prefix="vt-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        cfg = recipe(run_dir, total_steps)
        trainer = make_trainer(cfg, SegmentTask().build(cfg, data, run_dir), run_dir)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
        return step_times(clock.stamps, warmup)


def main(steps: int, rounds: int, warmup: int, threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="vt-bench-") as tmp:
        cfg = recipe(Path(tmp), total)
    data = load_split(cfg)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(data.train)} train canvases; "
        f"{rounds} rounds x {steps} timed steps (+{warmup} warm-up), batch {cfg.train.batch_size}, "
        f"{cfg.data.image_size} px, decoder {cfg.decoder}"
    )
    base: list[Stamp] = []
    ours: list[Stamp] = []
    for r in range(1, rounds + 1):
        if r % 2:
            b, o = run_baseline(cfg, data, total, warmup), run_visiontune(data, total, warmup)
        else:  # the other side first: a load spike does not always hit the same one
            o, b = run_visiontune(data, total, warmup), run_baseline(cfg, data, total, warmup)
        base, ours = base + b, ours + o
        report(f"round {r}", b, o, statistics.mean)
    report("mean", base, ours, statistics.mean, " (target <= 1.05)")
    report("median", base, ours, statistics.median, " (robust to load spikes)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/visiontune pairs, alternated")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    main(args.steps, args.rounds, args.warmup, args.threads)
