"""`clip_classify` training throughput and peak memory: visiontune's trainer vs a minimal PyTorch loop.

For each tune.method (full, lora, l_lora) both sides train the same `CLIPClassifier` on the same data:

* model: a small random-weight transformers CLIP built here (vision 64 px, patch 8, width 128, 4 layers, 4 heads;
  text width 64, 2 layers; projection 64) saved to a temp folder with `visiontune.testing.fixtures.word_tokenizer` and a
  `CLIPImageProcessor`, loaded through `ClipClassifyTask.build_model`, so the zero-shot head is built from the
  builtin templates with `data.prompt_names` ["red", "green", "blue"];
* data: `visiontune.testing.fixtures.image_folder(classes=3, per_class=64, size=64)` for training (192 images = 6 full
  batches of 32) plus a small separate val folder, so there is no stratified split and no partial batch;
* visiontune: the trainer `visiontune train` builds — `parse_config({task: clip_classify, ...})` ->
  `load_split` -> `ClipClassifyTask().build_model` -> `.plan_tuning` -> `classification_fit` -> the runner's
  `make_trainer` — with
  `train.max_steps` = warm-up + timed steps, `train.eval_steps` huge, `data.workers` 0 and every other setting at
  the task's defaults (light augmentation, cosine schedule, grad clipping, logging, tensorboard). A callback stamps
  wall time, process CPU time and `trainer.samples_seen` at every `on_step_end`, and takes the peak RSS at the
  last one, so the evaluation + checkpoint the Trainer runs after its final step are outside both figures;
* baseline: a fresh `CLIPClassifier` from the same `build_model`, made trainable by the same functions
  `plan_tuning` calls (`freeze_all_but_vision` for full, `apply_vision_lora(..., linearize=...)` for LoRA /
  L-LoRA; same seed, so the network and its trainable set are identical), an `ImageClassificationDataset` built as
  `classification_fit` builds it (same transforms) with `Collator` in a DataLoader (batch 32, shuffle, workers 0),
  AdamW on the trainable parameters (decay / no-decay groups, like `build_optimizer`), and forward ->
  loss.backward() -> step -> zero_grad in a plain loop, without clipping, schedule or logging.

Images/s = images trained between the end of warm-up step `--warmup` and the end of the last step, divided by
the wall time between them; img/CPU-s divides by the process CPU time instead, which is what to compare when other
jobs share the cores (with `--threads 1` the two agree on a quiet machine). Ratios are visiontune / baseline of
the medians over rounds.

Memory is process peak RSS from `resource.getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux): on CPU that is the
number that matters, and tracemalloc would miss torch's C++ allocations. ru_maxrss never goes down within a
process, so every measurement runs in a fresh process: a `forkserver` that has imported torch / transformers /
peft / visiontune once forks one child per (method, side) — a fork instead of a ~10 s import each time. "Peak RSS
delta" = ru_maxrss at the end of the last timed step minus the current RSS (/proc/self/statm) once the model is
built and its trainable set applied: what the training machinery (DataLoader, optimizer state, activations,
gradients, and for visiontune the Trainer itself) adds on top of the same loaded model. The absolute peak is
printed too; the table keeps the largest figures over rounds.

Measurements are interleaved (per round and method: baseline then visiontune, the order flipped every other
round) so background load hits both sides alike.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_clip_classify.py --steps 12 --warmup 3 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from visiontune.classify.task import classification_fit, load_split  # noqa: E402
from visiontune.clip.classify import ClipClassifyTask  # noqa: E402
from visiontune.clip.vision_lora import apply_vision_lora  # noqa: E402
from visiontune.core.dataset import Collator, ImageClassificationDataset  # noqa: E402
from visiontune.core.transforms import train_transform  # noqa: E402
from visiontune.recipe import parse_config  # noqa: E402
from visiontune.run.runner import make_trainer  # noqa: E402
from visiontune.testing.fixtures import image_folder, word_tokenizer  # noqa: E402

METHODS = ("full", "lora", "l_lora")
PROMPT_NAMES = ["red", "green", "blue"]  # image_folder: class c has channel c % 3 raised
MiB = 1024  # ru_maxrss is in KiB on Linux
# Imported once by the forkserver, so each measurement child starts with them loaded (a fork, not a ~10 s import).
# Named explicitly: Python 3.11's default preload of `__main__` never happens (it looks for a `main_path` key that
# `get_preparation_data` does not produce), and children re-run this script, which is cheap once these are loaded.
PRELOAD = [
    "torch",
    "torch.utils.tensorboard",
    "transformers",
    "transformers.trainer",
    "transformers.models.clip.modeling_clip",
    "peft",
    "visiontune.classify.task",
    "visiontune.clip.classify",
    "visiontune.clip.llora",
    "visiontune.run.runner",
    "visiontune.testing.fixtures",
]
hf_logging.disable_progress_bar()  # "Loading weights" bars in every child


def build_clip(out: Path) -> Path:
    """`fixtures.tiny_clip`, larger: 64 px, patch 8 (64 tokens + CLS), vision width 128 x 4 layers."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = word_tokenizer(out)
    text = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    vision = {
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    }
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)
    return out


def recipe(root: Path, method: str, run_dir: Path, total_steps: int, batch_size: int):
    return parse_config(
        {
            "task": "clip_classify",
            "model": str(root / "clip"),
            "output_dir": str(run_dir),
            "data": {
                "train": str(root / "train"),
                "val": str(root / "val"),
                "workers": 0,
                "prompt_names": PROMPT_NAMES,
            },
            "tune": {"method": method},
            "train": {"max_steps": total_steps, "eval_steps": 1_000_000, "batch_size": batch_size},
        }
    )


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def stamp(images_seen: int) -> tuple[float, float, int]:
    return time.perf_counter(), time.process_time(), images_seen


def images_per_second(stamps: list[tuple[float, float, int]], warmup: int) -> tuple[float, float]:
    """stamps[i] = (wall time, process CPU time, images seen so far) at the end of step i + 1; images per wall
    second and per CPU second after the first `warmup` steps."""
    if warmup < 1 or len(stamps) <= warmup:
        raise ValueError(f"need warmup >= 1 and more than {warmup} steps, got {len(stamps)}")
    (w0, c0, n0), (w1, c1, n1) = stamps[warmup - 1], stamps[-1]
    return (n1 - n0) / (w1 - w0), (n1 - n0) / (c1 - c0)


class StepClock(TrainerCallback):
    """(wall, CPU, images seen) at the end of every optimiser step; peak RSS as of the last one."""

    def __init__(self, trainer) -> None:
        self.trainer, self.stamps, self.peak = trainer, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(stamp(self.trainer.samples_seen))
        self.peak = peak_rss_kib()  # the Trainer's final eval + save run after this, outside the figure


def forever(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in trainable if p.ndim <= 1 or n.endswith(".bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def measure(
    side: str,
    method: str,
    root: str,
    total_steps: int,
    warmup: int,
    batch_size: int,
    threads: int | None,
    verbose: bool,
) -> dict:
    """One measurement, run in a fresh forked child: images/s and RSS figures of `side` for `method`."""
    if not verbose:  # progress bars and eval lines of the run; an exception still reaches the parent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    if threads:
        torch.set_num_threads(threads)
    root_dir = Path(root)
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{side}-{method}-", dir=root_dir))
    cfg = recipe(root_dir, method, run_dir, total_steps, batch_size)
    data = load_split(cfg)
    task = ClipClassifyTask()
    torch.manual_seed(cfg.seed)
    model = task.build_model(cfg, data.train.class_names)
    if side == "visiontune":
        plan = task.plan_tuning(model, cfg)
    else:  # the same network: same functions as plan_tuning, called directly
        model.label_smoothing = cfg.train.label_smoothing
        if method == "full":
            model.freeze_all_but_vision()
        else:
            apply_vision_lora(model, cfg.tune.lora, linearize=method == "l_lora")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ready = current_rss_kib()

    if side == "visiontune":
        trainer = make_trainer(cfg, classification_fit(model, cfg, data, plan), run_dir)
        clock = StepClock(trainer)
        trainer.add_callback(clock)
        trainer.train()
        stamps, peak = clock.stamps, clock.peak
    else:
        model.train()
        pre = model.preprocess
        aug = cfg.data.augment
        augment = train_transform(pre, preset=aug.preset, hflip=aug.hflip, policy=aug.policy)
        dataset = ImageClassificationDataset(data.train, augment, cfg.data.max_image_pixels, draft_size=pre.image_size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=Collator()
        )
        optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
        stamps, seen, batches = [], 0, forever(loader)
        for _ in range(total_steps):
            batch = next(batches)
            loss = model(batch["pixel_values"], batch["labels"])["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += int(batch["labels"].shape[0])
            stamps.append(stamp(seen))
            # Drop this step's graph now: a `loss` kept until the next forward holds tensors of the backward graph
            # (some 20 MiB with LoRA, 60 with L-LoRA here), which Trainer, returning loss.detach(), does not.
            del batch, loss
        peak = peak_rss_kib()
    ips, cpu_ips = images_per_second(stamps, warmup)
    return {
        "ips": ips,
        "cpu_ips": cpu_ips,
        "delta_mib": (peak - ready) / MiB,
        "peak_mib": peak / MiB,
        "trainable": trainable,
        "threads": torch.get_num_threads(),
    }


def main(
    steps: int, warmup: int, rounds: int, batch_size: int, methods: list[str], threads: int | None, verbose: bool
) -> None:
    total = warmup + steps
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="vt-bench-clip-") as tmp:
        root = Path(tmp)
        build_clip(root / "clip")
        image_folder(root / "train", classes=3, per_class=64, size=64)
        image_folder(root / "val", classes=3, per_class=4, size=64, seed=1)
        print(
            f"torch {torch.__version__}; {rounds} rounds x {steps} timed steps (+{warmup} warm-up), "
            f"batch {batch_size}, 192 train images at 64 px; one forked process per measurement",
            flush=True,
        )
        settings = (tmp, total, warmup, batch_size, threads, verbose)
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(rounds):
            for method in methods:
                sides = ("baseline", "visiontune") if r % 2 == 0 else ("visiontune", "baseline")
                for side in sides:
                    start = time.perf_counter()
                    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:  # a fresh process
                        res = pool.submit(measure, side, method, *settings).result()
                    res["wall_s"] = time.perf_counter() - start
                    results.setdefault((method, side), []).append(res)
                b, o = results[(method, "baseline")][-1], results[(method, "visiontune")][-1]
                print(
                    f"round {r + 1} {method:6s}: baseline {b['ips']:7.1f} img/s  visiontune {o['ips']:7.1f} img/s"
                    f"  ratio {o['ips'] / b['ips']:.3f}  CPU ratio {o['cpu_ips'] / b['cpu_ips']:.3f}"
                    f"  ({o['trainable']:,} trainable params,"
                    f" {o['threads']} threads, {b['wall_s']:.0f}+{o['wall_s']:.0f} s)",
                    flush=True,
                )
    report(results, methods)


def report(results: dict[tuple[str, str], list[dict]], methods: list[str]) -> None:
    """Medians over rounds of images/s (wall and CPU); the largest RSS figures seen."""
    ips = {k: statistics.median(r["ips"] for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r["cpu_ips"] for r in v) for k, v in results.items()}
    delta = {k: max(r["delta_mib"] for r in v) for k, v in results.items()}
    peak = {k: max(r["peak_mib"] for r in v) for k, v in results.items()}
    print()
    print(
        "| method | baseline img/s | visiontune img/s | ratio vt/base | baseline img/CPU-s | visiontune img/CPU-s "
        "| CPU ratio vt/base | peak RSS delta base / vt (MiB) | peak RSS base / vt (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in methods:
        b, o = (m, "baseline"), (m, "visiontune")
        print(
            f"| {m} | {ips[b]:.1f} | {ips[o]:.1f} | {ips[o] / ips[b]:.3f} | {cpu[b]:.1f} | {cpu[o]:.1f} "
            f"| {cpu[o] / cpu[b]:.3f} | {delta[b]:.0f} / {delta[o]:.0f} | {peak[b]:.0f} / {peak[o]:.0f} |"
        )
    print()
    for num, den in (("l_lora", "lora"), ("lora", "full")):
        if num in methods and den in methods:
            n, d = num, den
            print(
                f"speed {n} / {d}: wall baseline {ips[(n, 'baseline')] / ips[(d, 'baseline')]:.3f}  visiontune "
                f"{ips[(n, 'visiontune')] / ips[(d, 'visiontune')]:.3f};  CPU baseline "
                f"{cpu[(n, 'baseline')] / cpu[(d, 'baseline')]:.3f}  visiontune "
                f"{cpu[(n, 'visiontune')] / cpu[(d, 'visiontune')]:.3f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed optimiser steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/visiontune pairs per method, alternated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads in each measurement (default: torch's); 1 is steadier on "
        "cores shared with other jobs",
    )
    parser.add_argument("--verbose", action="store_true", help="show the measurement processes' own output")
    args = parser.parse_args()
    main(args.steps, args.warmup, args.rounds, args.batch_size, args.methods, args.threads, args.verbose)
