"""The whole quickstart process against a plain PyTorch script doing the same work, each in a fresh process.

visiontune's side is exactly what `make quickstart` runs after setup: `visiontune train mnist-efficientnet-lite0
output_dir=<tmp>` (import, data checks, the evaluation before training, 3 epochs with a validation after each, the
"after" evaluation, the model export, card, report and plots). The plain side is this file run with `--plain`: the
same split, dataset class, transforms, model and pretrained weights (as bench_overhead.py's baseline), AdamW with
decay / no-decay groups, warmup + cosine, label smoothing, an accuracy pass over the 1,000 held-out digits before
training and after every epoch, and the weights saved as safetensors. The sides alternate (plain, visiontune, ...)
so background load hits both alike; each process's wall time and CPU time (from the OS, children included) are
reported with their ratio, per round and as mean and median.

`--breakdown` then runs one more pair, not counted in the ratios, with each side's CPU seconds split by what it
spends them on (start-up, data, model, evaluation passes, training steps, checkpoints, export, report...): the
visiontune side is the same `visiontune train` call run in-process with its stages wrapped in clocks. CPU seconds
count under load where wall seconds do not; `--max-steps N` shortens the breakdown pair (train.max_steps for
visiontune, the same step count for the plain loop) to see the fixed costs quickly.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_quickstart_process.py --rounds 5 [--breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve()
VISIONTUNE = Path(sys.executable).with_name("visiontune")
RECIPE = "mnist-efficientnet-lite0"

# The breakdown's rows, in order; both sides fill the ones that apply to them.
STARTUP = "start-up: interpreter, imports, recipe"
DATA = "data: read, split, check"
MODEL = "model: build, pretrained weights"
SETUP = "set-up: datasets, Trainer, optimiser"
IMAGES = "images: decode + transform (all passes)"
EVAL = "evaluation passes: forward + metrics"
DIGEST = "evaluation reuse: weight digests"
FORWARD = "training: forward + loss + backward"
CLIP = "training: gradient clipping"
OPTIM = "training: optimiser step"
LOOP = "training: rest of the loop (schedule, logging)"
CALLBACKS = "training: callbacks (progress, metrics.jsonl, epoch)"
CHECKPOINTS = "checkpoints: save each epoch, load best"
EXPORT = "export: model, predictions, rank record"
REPORT = "report + plots, model cards"
RUN = "run folder, config, data report, summary"
REST = "rest (exit, unattributed)"


class Clock:
    """Exclusive CPU and wall seconds and call counts per named region: a region nested in another is subtracted
    from its parent, so the rows add up to the process's total."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}  # name -> [calls, CPU s, wall s]
        self.stack: list[list[float]] = []  # per open region: [children's CPU s, children's wall s]

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        self.stack.append([0.0, 0.0])
        try:
            yield
        finally:
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            children = self.stack.pop()
            self.add(name, cpu - children[0], wall - children[1])
            if self.stack:
                self.stack[-1][0] += cpu
                self.stack[-1][1] += wall

    def add(self, name: str, cpu: float, wall: float, calls: int = 1) -> None:
        row = self.rows.setdefault(name, [0, 0.0, 0.0])
        row[0], row[1], row[2] = row[0] + calls, row[1] + cpu, row[2] + wall

    def wrap(self, owner: object, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed_call(*args, **kwargs):
            with self.region(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed_call)

    def started(self, spawned: float) -> None:
        """The process's CPU and wall seconds so far (from its start, `spawned` by the parent) as start-up."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.add(STARTUP, usage.ru_utime + usage.ru_stime - sum(r[1] for r in self.rows.values()), 0.0)
        self.rows[STARTUP][2] = time.time() - spawned - sum(r[2] for r in self.rows.values())

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.rows))


NO_CLOCK = Clock()


def plain(out: Path, clock: Clock = NO_CLOCK, max_steps: int | None = None, spawned: float = 0.0) -> None:
    """The plain script: what the quickstart computes, without the framework."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from bench_overhead import param_groups
    from safetensors.torch import save_file

    from visiontune.classify.task import ClassifyTask, load_split
    from visiontune.core.dataset import Collator, ImageClassificationDataset
    from visiontune.core.transforms import eval_transform, train_transform
    from visiontune.recipe import find_recipe, load_recipe

    cfg = load_recipe(find_recipe(RECIPE), [f"output_dir={out}"])
    if clock is not NO_CLOCK:
        clock.started(spawned)
        clock.wrap(ImageClassificationDataset, "__getitem__", IMAGES)
        clock.wrap(torch.optim.AdamW, "step", OPTIM)
    torch.manual_seed(cfg.seed)
    with clock.region(DATA):
        data = load_split(cfg)
    with clock.region(MODEL):
        model = ClassifyTask().build_model(cfg, data.train.class_names)
    with clock.region(SETUP):
        pre, train, aug = model.preprocess, cfg.train, cfg.data.augment
        augment = train_transform(pre, preset=aug.preset, hflip=aug.hflip, policy=aug.policy)
        train_set = ImageClassificationDataset(data.train, augment, cfg.data.max_image_pixels, pre.image_size)
        val_set = ImageClassificationDataset(data.val, eval_transform(pre), cfg.data.max_image_pixels)
        loader = torch.utils.data.DataLoader(train_set, train.batch_size, shuffle=True, collate_fn=Collator())
        val_loader = torch.utils.data.DataLoader(val_set, train.batch_size, collate_fn=Collator())
        optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr)
        epochs = int(train.epochs) if max_steps is None else 1
        total = epochs * len(loader) if max_steps is None else max_steps
        warm = math.ceil(train.warmup_ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))),
        )

    def accuracy() -> float:
        with clock.region(EVAL):
            model.eval()
            right = 0
            with torch.no_grad():
                for batch in val_loader:
                    right += int((model.backbone(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum())
            model.train()
            return right / len(val_set)

    print(f"before {accuracy():.4f}", flush=True)
    for epoch in range(epochs):
        with clock.region(LOOP):
            for step, batch in enumerate(loader):
                if step == total:
                    break
                with clock.region(FORWARD):
                    logits = model.backbone(batch["pixel_values"])
                    loss = F.cross_entropy(logits, batch["labels"], label_smoothing=train.label_smoothing)
                    loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        print(f"epoch {epoch + 1} {accuracy():.4f}", flush=True)
    with clock.region(EXPORT):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))


def visiontune_clocked(out: Path, clock: Clock, max_steps: int | None, spawned: float) -> None:
    """`visiontune train RECIPE output_dir=OUT` in this process, its stages wrapped in `clock`."""
    import torch
    import transformers
    from transformers.trainer_callback import CallbackHandler

    import visiontune.export.card
    import visiontune.report
    import visiontune.run.runner as runner
    import visiontune.run.trainer
    from visiontune.classify.task import ClassifyTask
    from visiontune.cli import main
    from visiontune.core.dataset import ImageClassificationDataset

    run_task = runner.run_task

    def clocked_run_task(*args, **kwargs):
        clock.started(spawned)
        with clock.region(RUN):
            return run_task(*args, **kwargs)

    runner.run_task = clocked_run_task  # Task.train imports it from the runner when called
    trainer_class = visiontune.run.trainer.VisiontuneTrainer
    for owner, attr, name in [
        (ClassifyTask, "prepare", DATA),
        (ClassifyTask, "build", MODEL),
        (runner, "make_trainer", SETUP),
        (ImageClassificationDataset, "__getitem__", IMAGES),
        (trainer_class, "run_evaluation", EVAL),
        (visiontune.run.trainer, "weights_digest", DIGEST),
        (transformers.Trainer, "train", LOOP),
        (trainer_class, "training_step", FORWARD),
        (transformers.Trainer, "_clip_grad_norm", CLIP),
        (torch.optim.AdamW, "step", OPTIM),
        (CallbackHandler, "call_event", CALLBACKS),
        (trainer_class, "_save_checkpoint", CHECKPOINTS),
        (transformers.Trainer, "_load_best_model", CHECKPOINTS),
        (ClassifyTask, "save", EXPORT),
        (trainer_class, "record_rank", EXPORT),
        (visiontune.report, "write_report", REPORT),
        (visiontune.export.card, "write_run_cards", REPORT),
    ]:
        clock.wrap(owner, attr, name)
    sys.argv = ["visiontune", "train", RECIPE, f"output_dir={out}"]
    if max_steps is not None:
        sys.argv.append(f"train.max_steps={max_steps}")
    main()


def timed(command: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one child process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(rounds: int) -> None:
    sides: dict[str, list[tuple[float, float]]] = {"plain": [], "visiontune": []}
    for r in range(1, rounds + 1):
        with tempfile.TemporaryDirectory(prefix="vt-qs-") as tmp:
            out = Path(tmp)
            sides["plain"].append(timed([sys.executable, str(HERE), "--plain", str(out / "plain")]))
            command = [str(VISIONTUNE), "train", RECIPE, f"output_dir={out / 'vt'}"]
            sides["visiontune"].append(timed(command))
        (pw, pc), (vw, vc) = sides["plain"][-1], sides["visiontune"][-1]
        print(
            f"round {r}: plain {pw:.1f} s wall {pc:.1f} s CPU | visiontune {vw:.1f} s wall {vc:.1f} s CPU | "
            f"ratio wall {vw / pw:.3f} CPU {vc / pc:.3f}",
            flush=True,
        )
    pairs = list(zip(sides["plain"], sides["visiontune"], strict=True))
    for i, what in enumerate(("wall", "CPU")):
        ratios = [v[i] / p[i] for p, v in pairs]
        print(
            f"{what} ratio: mean {statistics.mean(ratios):.3f}, median {statistics.median(ratios):.3f}, "
            f"of summed seconds {sum(v[i] for _, v in pairs) / sum(p[i] for p, _ in pairs):.3f} "
            f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)}; target <= 1.05)"
        )


def breakdown(max_steps: int | None) -> None:
    """One more plain / visiontune pair, each writing its clocked stages; printed side by side (CPU s, calls)."""
    tables, totals = {}, {}
    with tempfile.TemporaryDirectory(prefix="vt-qs-") as tmp:
        for side in ("plain", "visiontune"):
            stages = Path(tmp) / f"{side}.json"
            command = [sys.executable, str(HERE), f"--{side}", str(Path(tmp) / side), "--stages", str(stages)]
            command += ["--spawned", repr(time.time())]
            command += ["--max-steps", str(max_steps)] if max_steps is not None else []
            totals[side] = timed(command)
            tables[side] = json.loads(stages.read_text())
    steps = f"train.max_steps={max_steps}" if max_steps is not None else "the whole recipe"
    print(f"\nbreakdown ({steps}), exclusive CPU s (calls); wall s in brackets")
    print(f"{'':<55} {'plain':>22} {'visiontune':>22} {'difference':>11}")
    names = list(dict.fromkeys([STARTUP, *tables["plain"], *tables["visiontune"]]))
    for side, table in tables.items():  # what no region claimed: exit, atexit, the child's last moments
        table[REST] = [0, totals[side][1] - sum(r[1] for r in table.values()), 0.0]
    for name in [*names, REST]:
        p, v = (tables[s].get(name, [0, 0.0, 0.0]) for s in ("plain", "visiontune"))
        cell = [f"{r[1]:8.2f} ({int(r[0]):>5}) [{r[2]:6.1f}]" if r[0] or name == REST else "" for r in (p, v)]
        print(f"{name:<55} {cell[0]:>22} {cell[1]:>22} {v[1] - p[1]:+11.2f}")
    (pw, pc), (vw, vc) = totals["plain"], totals["visiontune"]
    print(f"{'total (OS: CPU s, wall s)':<55} {pc:14.2f} {pw:7.1f} {vc:14.2f} {vw:7.1f} {vc - pc:+11.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="plain/visiontune pairs, alternated (0: none)")
    parser.add_argument("--breakdown", action="store_true", help="then one clocked pair: CPU s per stage")
    parser.add_argument("--max-steps", type=int, help="the breakdown pair trains this many steps only")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # run the plain side into this folder
    parser.add_argument("--visiontune", type=Path, help=argparse.SUPPRESS)  # the clocked visiontune side
    parser.add_argument("--stages", type=Path, help=argparse.SUPPRESS)  # where a clocked side writes its table
    parser.add_argument("--spawned", type=float, default=0.0, help=argparse.SUPPRESS)  # the parent's spawn time
    args = parser.parse_args()
    if args.plain or args.visiontune:
        sys.path.insert(0, str(HERE.parent))
        clock = Clock() if args.stages else NO_CLOCK
        if args.stages:
            import atexit

            atexit.register(clock.save, args.stages)
        if args.plain:
            args.plain.mkdir(parents=True)
            plain(args.plain, clock, args.max_steps, args.spawned)
        else:
            visiontune_clocked(args.visiontune, clock, args.max_steps, args.spawned)
    else:
        if args.rounds > 0:
            main(args.rounds)
        if args.breakdown:
            breakdown(args.max_steps)
