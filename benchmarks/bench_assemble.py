"""`vlm_assemble` training throughput and peak memory on the real assembled model, against a plain PyTorch loop.

Model: builtin:efficientnet-lite0 (ImageNet, frozen) + mlp2x_gelu projector + builtin:smollm2-135m-instruct, 96 px
images (9 image tokens), exactly as the built-in recipes (src/visiontune/recipes/assemble/*.yaml) build it. Three modes:

* align: only the projector trains (1.07 M parameters), on builtin:mnist-5k-captions;
* instruct-lora: projector + LoRA r 16 on every Linear of the LM, on builtin:mnist-5k-qa;
* instruct-full: projector + the whole LM (134 M), on builtin:mnist-5k-qa.

visiontune side: what `visiontune train` runs — `parse_config` -> `VlmAssembleTask.prepare`'s steps (`load_model`,
then `prepare_data`: assistant-only labels, cached) -> `VlmAssembleTask().build` (`set_trainable` -> `vlm_fit` with
`AssembleTrainer`, group_by_length) -> the runner's `make_trainer`, with `train.max_steps` = warm-up + timed steps
and no evaluation. The two halves of `prepare` are called one by one so that the RSS can be read between them.
Baseline: the same model, trainable set and tokenised records through `VlmCollator` in a `DataLoader(shuffle=True)`
-> forward -> backward -> AdamW -> zero_grad.

Tokens/s = non-padding tokens (image tokens included) trained between the end of warm-up step `--warmup` and the
last step, per wall second (and per process CPU second). Peak RSS (ru_maxrss) at the last timed step; "delta" is
that minus the RSS once the model is loaded. Each measurement runs in a fresh process forked from a forkserver;
sides alternate, and their order flips every round.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_assemble.py --steps 12 --warmup 3 --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_vlm_sft import Counter, MiB, StepClock, current_rss_kib, quiet, rates  # noqa: E402

BATCH = 8
MODES = {
    "align": {"stage": "align", "data": {"train": "builtin:mnist-5k-captions"}},
    "instruct-lora": {"stage": "instruct", "data": {"train": "builtin:mnist-5k-qa"}, "tune": {"language": "lora"}},
    "instruct-full": {
        "stage": "instruct",
        "data": {"train": "builtin:mnist-5k-qa"},
        "tune": {"language": "full"},
        "train": {"lr": 5e-5},
    },
}


def recipe(mode: str, run_dir: Path, total_steps: int):
    from visiontune.recipe import parse_config

    spec = MODES[mode]
    raw = {
        "task": "vlm_assemble",
        "stage": spec["stage"],
        "vision": "builtin:efficientnet-lite0",
        "language": "builtin:smollm2-135m-instruct",
        "image_size": 96,
        "output_dir": str(run_dir),
        "data": {**spec["data"], "limit": 400, "val_split": 0},
        "tune": spec.get("tune", {}),
        "train": {
            "batch_size": BATCH,
            "max_steps": total_steps,
            "eval_steps": 10**6,
            "warmup_ratio": 0.0,
            "logging_steps": 5,
            **spec.get("train", {}),
        },
    }
    return parse_config(raw)


def prepared(mode: str, run_dir: Path, total_steps: int):
    """`VlmAssembleTask().prepare(cfg)` in its two steps, with the RSS read once the model is loaded (before the
    data); the model's trainable set is not applied yet."""
    from visiontune.vlm.assemble import load_model, read_stage_data
    from visiontune.vlm.sft import VlmPrepared, prepare_data

    cfg = recipe(mode, run_dir, total_steps)
    model, processor = load_model(cfg)
    ready = current_rss_kib()
    data = prepare_data(cfg, processor, read=lambda spec: read_stage_data(spec, cfg), model_key=mode)
    return cfg, VlmPrepared(model, processor, data), ready


def measure_visiontune(mode: str, root: str, total_steps: int, warmup: int, threads: int | None, verbose: bool):
    quiet(verbose, threads)
    os.environ["VISIONTUNE_CACHE"] = str(Path(root) / "cache")
    from visiontune.run.runner import make_trainer
    from visiontune.vlm.assemble import VlmAssembleTask

    run_dir = Path(tempfile.mkdtemp(prefix=f"vt-{mode}-", dir=root))
    cfg, inputs, ready = prepared(mode, run_dir, total_steps)
    fit = VlmAssembleTask().build(cfg, inputs, run_dir)
    trainer = make_trainer(cfg, fit, run_dir)
    clock = StepClock(Counter(trainer))
    trainer.add_callback(clock)
    trainer.train()
    return summarise(clock.stamps, clock.peak, ready, warmup, fit.model)


def measure_loop(mode: str, root: str, total_steps: int, warmup: int, threads: int | None, verbose: bool):
    quiet(verbose, threads)
    os.environ["VISIONTUNE_CACHE"] = str(Path(root) / "cache")
    from visiontune.vlm.assemble import set_trainable
    from visiontune.vlm.collate import VlmCollator
    from visiontune.vlm.sft import TokenizedDataset

    run_dir = Path(tempfile.mkdtemp(prefix=f"loop-{mode}-", dir=root))
    cfg, inputs, ready = prepared(mode, run_dir, total_steps)
    model, processor, data = set_trainable(inputs.model, cfg), inputs.processor, inputs.data  # as the task's build
    torch.manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        TokenizedDataset(data.train_tokens, data.train),
        batch_size=BATCH,
        shuffle=True,
        collate_fn=VlmCollator(processor, cfg.data.max_image_pixels),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=0.0)
    model.train()
    stamps, real, total, trained, peak = [], 0, 0, 0, 0
    batches = iter(loader)
    for _ in range(total_steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
        trained += int((batch["labels"] != -100).sum())
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as the Trainer does (max_grad_norm 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del batch, loss
        stamps.append((time.perf_counter(), time.process_time(), real, total, trained))
        peak = max(peak, _peak())
    return summarise(stamps, peak, ready, warmup, model)


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def summarise(stamps, peak: int, ready: int, warmup: int, model) -> dict:
    out = rates(stamps, warmup)
    out.update(
        peak_mib=peak / MiB,
        delta_mib=(peak - ready) / MiB,
        threads=torch.get_num_threads(),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return out


SIDES = {"visiontune": measure_visiontune, "loop": measure_loop}


def run(ctx, fn, *args):
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:  # a fresh process
        return pool.submit(fn, *args).result()


def main(steps: int, warmup: int, rounds: int, modes: list[str], threads: int | None, verbose: bool) -> None:
    from visiontune.core.assets import smollm2_dir

    smollm2_dir()  # build the cached SmolLM2 folder once, outside the measurements
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "visiontune.vlm.assemble", "visiontune.run.runner"])
    total = warmup + steps
    print(f"torch {torch.__version__}; batch {BATCH}; {rounds} rounds x {steps} timed steps (+{warmup} warm-up)")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="vt-bench-assemble-") as root:
        for mode in modes:
            for r in range(rounds):
                for side in ["visiontune", "loop"] if r % 2 == 0 else ["loop", "visiontune"]:
                    res = run(ctx, SIDES[side], mode, root, total, warmup, threads, verbose)
                    results.setdefault((mode, side), []).append(res)
                    print(
                        f"{mode:13s} round {r + 1} {side:10s}: {res['tps']:6.1f} tok/s {res['cpu_tps']:6.1f} "
                        f"tok/CPU-s padding {res['padding']:.3f} real/step {res['real_per_step']:.0f} "
                        f"peak {res['peak_mib']:.0f} MiB (delta {res['delta_mib']:.0f}) "
                        f"{res['trainable']:,} trainable",
                        flush=True,
                    )
    print("\n| mode | side | tok/s | tok/CPU-s | vt/loop tok/s | padding | peak RSS (MiB) | delta (MiB) | trainable |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in modes:
        med = {
            s: {k: statistics.median(x[k] for x in results[(mode, s)]) for k in results[(mode, s)][0]}
            for s in ("visiontune", "loop")
        }
        for side in ("visiontune", "loop"):
            m = med[side]
            ratio = med["visiontune"]["tps"] / m["tps"]
            print(
                f"| {mode} | {side} | {m['tps']:.1f} | {m['cpu_tps']:.1f} | {ratio:.3f} | {m['padding']:.3f} | "
                f"{m['peak_mib']:.0f} | {m['delta_mib']:.0f} | {int(m['trainable']):,} |"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per measurement")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    main(args.steps, args.warmup, args.rounds, args.modes, args.threads, args.verbose)
