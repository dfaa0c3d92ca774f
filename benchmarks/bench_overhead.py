"""Framework overhead: seconds per optimiser step of visiontune's training path vs a minimal PyTorch loop.

Both sides train the quickstart model (`builtin:efficientnet-lite0`, 64 px, batch 64) on the same MNIST-5k split
with the same dataset class, transforms, collator, AdamW (decay / no-decay groups) and label smoothing, with
data loading in the main process (workers 0). visiontune's trainer is built as `visiontune train` builds it
(recipe -> `load_split` -> `ClassifyTask().build_model` (`resolve_classifier`) -> `.plan_tuning` ->
`classification_fit` -> the runner's `make_trainer`); a callback timestamps every `on_step_end`. The two are
measured alternately (baseline, ours, baseline, ours, ...) in one process so background load hits both alike; the
first `--warmup` steps of every measurement are not timed. Wall and process-CPU time per step are both reported.
On cores shared with other jobs, `--threads 1` keeps the figures stable (with two torch threads and a busy second
core, step times swing several-fold).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_overhead.py --steps 25 --rounds 2 [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from visiontune.classify.config import ClassifyConfig  # noqa: E402
from visiontune.classify.model import ImageClassifier  # noqa: E402
from visiontune.classify.task import ClassifyTask, SplitData, classification_fit, load_split  # noqa: E402
from visiontune.core.dataset import Collator, ImageClassificationDataset  # noqa: E402
from visiontune.core.transforms import train_transform  # noqa: E402
from visiontune.recipe import find_recipe, load_recipe  # noqa: E402
from visiontune.run.runner import make_trainer  # noqa: E402

RECIPE = find_recipe("mnist-efficientnet-lite0")  # the quickstart recipe (package data)


Stamp = tuple[float, float]  # (wall seconds, process CPU seconds)


def stamp() -> Stamp:
    return time.perf_counter(), time.process_time()


class StepClock(TrainerCallback):
    """Records wall and CPU time at the end of every optimiser step."""

    def __init__(self) -> None:
        self.stamps: list[Stamp] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(stamp())


def step_times(stamps: list[Stamp], warmup: int) -> list[Stamp]:
    """(wall, CPU) durations of the steps after the first `warmup` (stamps[i] is taken at the end of step i + 1)."""
    if warmup < 1 or len(stamps) <= warmup:
        raise ValueError(f"need warmup >= 1 and more than {warmup} stamps, got {len(stamps)}")
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]


def recipe(run_dir: Path, total_steps: int) -> ClassifyConfig:
    overrides = [f"output_dir={run_dir}", f"train.max_steps={total_steps}", "train.eval_steps=100000"]
    return load_recipe(RECIPE, overrides)


def fresh_model(cfg: ClassifyConfig, data: SplitData) -> ImageClassifier:
    """A new copy of the pretrained model, with the recipe's input size, as `ClassifyTask.build` makes it."""
    return ClassifyTask().build_model(cfg, data.train.class_names)


def forever(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_baseline(cfg: ClassifyConfig, data: SplitData, total_steps: int, warmup: int) -> list[Stamp]:
    """Hand-written loop: DataLoader -> forward -> cross-entropy -> backward -> AdamW step."""
    torch.manual_seed(cfg.seed)
    model = fresh_model(cfg, data).train()
    pre, train = model.preprocess, cfg.train
    aug = cfg.data.augment
    augment = train_transform(pre, preset=aug.preset, hflip=aug.hflip, policy=aug.policy)
    dataset = ImageClassificationDataset(data.train, augment, cfg.data.max_image_pixels, draft_size=pre.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train.batch_size, shuffle=True, num_workers=0, collate_fn=Collator()
    )
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr)
    stamps = []
    batches = forever(loader)
    for _ in range(total_steps):
        batch = next(batches)
        logits = model.backbone(batch["pixel_values"])
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=train.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del batch, logits, loss  # as Trainer does; held into the next forward they cost ~4 % here
        stamps.append(stamp())
    return step_times(stamps, warmup)


def run_visiontune(data: SplitData, total_steps: int, warmup: int) -> list[Stamp]:
    """visiontune's path: the trainer `visiontune train` builds (`ClassifyTask.build` -> `make_trainer`)."""
    with tempfile.TemporaryDirectory(prefix="vt-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        cfg = recipe(run_dir, total_steps)
        model = fresh_model(cfg, data)
        plan = ClassifyTask().plan_tuning(model, cfg)
        trainer = make_trainer(cfg, classification_fit(model, cfg, data, plan), run_dir)
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
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(data.train)} train images; "
        f"{rounds} rounds x {steps} timed steps (+{warmup} warm-up), batch {cfg.train.batch_size}"
    )
    base: list[Stamp] = []
    ours: list[Stamp] = []
    for r in range(1, rounds + 1):
        b, o = run_baseline(cfg, data, total, warmup), run_visiontune(data, total, warmup)
        base, ours = base + b, ours + o
        report(f"round {r}", b, o, statistics.mean)
    report("mean", base, ours, statistics.mean, " (target <= 1.05)")
    report("median", base, ours, statistics.median, " (robust to load spikes)")


def report(label: str, base: list[Stamp], ours: list[Stamp], stat: Callable[[list[float]], float], note: str = ""):
    """Wall s/step and CPU s/step (process time: not inflated while other jobs hold the cores) of both sides."""
    (bw, bc), (ow, oc) = ([stat(list(col)) for col in zip(*side, strict=True)] for side in (base, ours))
    print(
        f"{label}: wall s/step baseline {bw:.4f} visiontune {ow:.4f} ratio {ow / bw:.3f} | "
        f"CPU s/step baseline {bc:.4f} visiontune {oc:.4f} ratio {oc / bc:.3f}{note}",
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="timed optimiser steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/visiontune pairs, alternated")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    main(args.steps, args.rounds, args.warmup, args.threads)
