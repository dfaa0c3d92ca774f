"""`vlm_preference` (DPO, LoRA) training throughput and peak memory: visiontune's trainer vs TRL's `DPOTrainer`.

Both sides train the same model on the same pairs with the same batch size, LoRA adapters and loss:

* model: the Qwen2-VL of bench_vlm_sft.py (`build_qwen2_vl`: the tiny fixture's tokenizer, template and processor;
  text 128 x 4 layers, vision 64 x 2 layers), saved to a temp folder and loaded from there by both sides.
* data: 64 pairs written by `make_pairs` (seed 0): one image each (random size 80..160 px per side), a question of
  3-12 words, a chosen and a rejected answer of 1-20 words drawn from the fixture corpus; TRL's conversational
  prompt/chosen/rejected/images layout, which both sides read (TRL from a `datasets.Dataset` of the same records
  with PIL images).
* visiontune: what `visiontune train` runs: `parse_config({task: vlm_preference, ...})` -> `VlmPreferenceTask`
  `.prepare` (pairs checked, tokenised, cached) -> `.build` (`apply_tuning`: LoRA r 16 / alpha 32 / dropout 0.05 on
  every Linear of the language model, the projector `visual.merger` trained fully; reference = adapters off; each
  pair's image encoded once per forward) -> the runner's `make_trainer`; batch 4 pairs, sigmoid loss, beta 0.1,
  `data.val_split` 0, `train.max_steps` = warm-up + timed steps.
* TRL: `DPOTrainer(model=<the same checkpoint>, args=DPOConfig(use_cpu=True, bf16=False, per_device_train_batch_size
  =4, max_steps=N, beta=0.1, report_to="none"), train_dataset=..., processing_class=<the same processor>,
  peft_config=<the LoraConfig visiontune builds>)`, its other defaults (reference = adapters off too; one forward
  over [chosen; rejected] with the images given for both; gradient checkpointing as DPOConfig sets it).
* TRL no-GC: the same with `gradient_checkpointing=False`, to separate that default from the rest.

Pairs per second = pairs trained between the end of warm-up step `--warmup` and the end of the last step divided by
the wall time between them (pairs per CPU-second: by process CPU time). Memory is the process's peak RSS
(`ru_maxrss`) at the end of the last timed step; "delta" subtracts the RSS once the model is loaded. Every
measurement runs in a fresh process forked from a `forkserver` that imported the libraries once; the order of the
sides rotates every round. Ratios are visiontune / TRL of the medians over rounds.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_preference.py --steps 12 --warmup 3 --rounds 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from bench_vlm_sft import PRELOAD, build_qwen2_vl, current_rss_kib, peak_rss_kib, quiet, run, trl_lora_config  # noqa: E402, I001
from PIL import Image, ImageDraw  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

SIDES = ("visiontune", "trl", "trl_nogc")
MiB = 1024
BATCH = 4


def build_vision_heavy(out: Path, depth: int, width: int) -> Path:
    """bench_vlm_sft's Qwen2-VL with a deeper / wider vision tower (`--vision-depth`, `--vision-width`) and images
    up to 224^2 pixels (64 tokens after the 2x2 merge): where a pair's second image encoding costs what it costs on
    real VLMs (a large share of the step)."""
    import json as _json

    build_qwen2_vl(out)
    config = _json.loads((out / "config.json").read_text())
    config["vision_config"].update(depth=depth, embed_dim=width, num_heads=max(2, width // 32))
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    (out / "config.json").write_text(_json.dumps(config))
    processor = _json.loads((out / "processor_config.json").read_text())
    processor["image_processor"]["size"]["longest_edge"] = 224 * 224  # the fixture caps images at 112^2 pixels
    (out / "processor_config.json").write_text(_json.dumps(processor))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(AutoConfig.from_pretrained(out))
    for f in out.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(out)
    return out


def make_pairs(root: Path, n: int = 64, seed: int = 0, sizes: tuple[int, int] = (80, 160)) -> Path:
    from visiontune.testing.vlm_fixtures import corpus

    rng = random.Random(seed)
    words = [w for line in corpus() for w in line.split() if re.fullmatch(r"[A-Za-z,.']+", w)]
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        w, h = rng.randint(*sizes), rng.randint(*sizes)
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(image).rectangle((w // 4, h // 4, w // 2, h // 2), fill=tuple(rng.randrange(256) for _ in "rgb"))
        image.save(root / "img" / f"{i}.png")
        question = " ".join(rng.choices(words, k=rng.randint(3, 12))).capitalize() + "?"
        answers = [" ".join(rng.choices(words, k=rng.randint(1, 20))) for _ in range(2)]
        records.append(
            {
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": answers[0]}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": answers[1] + " no"}]}],
                "images": [f"img/{i}.png"],
            }
        )
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def recipe(root: Path, run_dir: Path, total_steps: int):
    from visiontune.recipe import parse_config

    return parse_config(
        {
            "task": "vlm_preference",
            "model": str(root / "qwen2_vl"),
            "output_dir": str(run_dir),
            "data": {"train": str(root / "pairs.jsonl"), "val_split": 0, "workers": 0},
            "train": {"max_steps": max(total_steps, 1), "batch_size": BATCH, "eval_steps": 1_000_000},
        }
    )


def trl_dataset(root: Path):
    from datasets import Dataset

    rows = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    columns = {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
    images = [[Image.open(root / p).convert("RGB") for p in r["images"]] for r in rows]
    return Dataset.from_dict({**columns, "images": images})


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []
        self.peak = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append((time.perf_counter(), time.process_time()))
        self.peak = peak_rss_kib()


def measure(side: str, root: str, total_steps: int, warmup: int, threads: int | None, verbose: bool) -> dict:
    quiet(verbose, threads)
    root_dir = Path(root)
    os.environ["VISIONTUNE_CACHE"] = str(root_dir / "cache")
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{side}-", dir=root_dir))
    cfg = recipe(root_dir, run_dir, total_steps)
    if side == "visiontune":
        from visiontune.run.runner import make_trainer
        from visiontune.vlm.model import load_vlm
        from visiontune.vlm.preference import PreferencePrepared, VlmPreferenceTask, prepare_preferences

        model, processor = load_vlm(cfg)
        ready = current_rss_kib()
        prepared = PreferencePrepared(model, processor, prepare_preferences(cfg, processor))
        trainer = make_trainer(cfg, VlmPreferenceTask().build(cfg, prepared, run_dir), run_dir)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForImageTextToText.from_pretrained(cfg.model)
        processor = AutoProcessor.from_pretrained(cfg.model)
        ready = current_rss_kib()
        args = DPOConfig(
            output_dir=str(run_dir),
            use_cpu=True,
            bf16=False,
            per_device_train_batch_size=BATCH,
            max_steps=total_steps,
            beta=cfg.loss.beta,
            report_to="none",
            disable_tqdm=True,
            seed=cfg.seed,
            **({"gradient_checkpointing": False} if side == "trl_nogc" else {}),
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=trl_dataset(root_dir),
            processing_class=processor,
            peft_config=trl_lora_config(model, cfg.tune),
        )
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    (w0, c0), (w1, c1) = clock.stamps[warmup - 1], clock.stamps[-1]
    pairs = (len(clock.stamps) - warmup) * BATCH
    return {
        "pairs_per_s": pairs / (w1 - w0),
        "pairs_per_cpu_s": pairs / (c1 - c0),
        "peak_mib": clock.peak / MiB,
        "delta_mib": (clock.peak - ready) / MiB,
        "gc": bool(trainer.args.gradient_checkpointing),
        "threads": torch.get_num_threads(),
    }


def main(
    steps: int,
    warmup: int,
    rounds: int,
    sides: list[str],
    threads: int | None,
    verbose: bool,
    vision: tuple[int, int] | None = None,
    sizes: tuple[int, int] = (80, 160),
) -> None:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, "trl.trainer.dpo_trainer"])
    with tempfile.TemporaryDirectory(prefix="vt-bench-pref-") as tmp:
        root = Path(tmp)
        if vision:
            build_vision_heavy(root / "qwen2_vl", *vision)
        else:
            build_qwen2_vl(root / "qwen2_vl")
        make_pairs(root, sizes=sizes)
        print(
            f"torch {torch.__version__}; {rounds} rounds x {steps} timed steps (+{warmup}), {BATCH} pairs/step; "
            f"vision depth/width {vision or 'of bench_vlm_sft'}; images {sizes[0]}..{sizes[1]} px"
        )
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(rounds):
            for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                out = run(ctx, measure, side, tmp, warmup + steps, warmup, threads, verbose)
                results[side].append(out)
                print(f"round {r + 1} {side}: {json.dumps({k: round(v, 3) for k, v in out.items()})}", flush=True)
    keys = ("pairs_per_s", "pairs_per_cpu_s", "peak_mib", "delta_mib")
    medians = {s: {k: statistics.median(o[k] for o in results[s]) for k in keys} for s in sides}
    print("\n| | " + " | ".join(sides) + " | " + " | ".join(f"ratio vs {s}" for s in sides[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(sides) - 1))
    for k in keys:
        cells = [f"{medians[s][k]:.2f}" for s in sides]
        ratios = [f"{medians[sides[0]][k] / medians[s][k]:.2f}" for s in sides[1:]]
        print(f"| {k} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--vision-depth", type=int, default=None, help="a vision-heavy model: tower depth")
    parser.add_argument("--vision-width", type=int, default=128)
    parser.add_argument("--image-px", type=int, nargs=2, default=(80, 160), help="image sides drawn from LO..HI")
    a = parser.parse_args()
    vision = (a.vision_depth, a.vision_width) if a.vision_depth else None
    main(a.steps, a.warmup, a.rounds, a.sides, a.threads, a.verbose, vision, tuple(a.image_px))
