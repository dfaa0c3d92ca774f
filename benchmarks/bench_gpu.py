"""`vlm_sft` on a GPU at real size: tokens/s, MFU and peak memory for LoRA and full fine-tuning, with and without
`data.packing`, against TRL's `SFTTrainer` on the same model, data and batch.

* model: random weights in the shape of Qwen2-VL-2B-Instruct (text: hidden 1536, 28 layers, 12 heads / 2 KV heads,
  MLP 8960, vocabulary 151,936, tied embeddings; vision: 32 blocks of width 1280, 16 heads, patch 14, 2x2 merge into
  1536), built from a config here (nothing is downloaded), with the tiny fixtures' trained Qwen2 tokenizer and chat
  template, images capped at 448x448 px (up to 256 image tokens). Saved once and loaded by every side.
* data: 256 conversations, one image each (224..448 px a side), 1-3 turns of random fixture words.
* sides (each in a fresh process): visiontune `lora` / `full`, each padded and packed (`data.packing: true`), and TRL
  `SFTTrainer` `lora` / `full` (padded; TRL does not pack VLM rows). All bf16 (`train.precision: bf16` / TRL `bf16`),
  gradient checkpointing on, per-device batch `--batch`, LoRA r 16 / alpha 32 on every Linear of the language model
  and the projector trained fully (visiontune's defaults, given to TRL as the same `LoraConfig`), AdamW, lr 1e-5.
* tokens/s: non-padding text tokens of the batches trained between the end of step `--warmup` and the last step,
  over the wall time between them (CUDA synchronised at each step end).
* MFU: model FLOPs per second over the GPU's dense bf16 peak (`--peak-tflops`, else from the device name: H100/H200
  989, A100 312). Model FLOPs of a batch: forward = 2 x (language-model parameters without the embedding, plus the
  output head) per text token + 2 x layers x hidden x row length per text token (causal attention) + 2 x
  vision-tower parameters per image patch; training = 3 x forward for full tuning, 2 x forward for LoRA (no
  weight gradients for the frozen base); recomputation by gradient checkpointing is not counted (the usual MFU).
* peak memory: `torch.cuda.max_memory_allocated` over the timed steps.

Writes a table to stdout and a markdown block for BENCHMARKS.md. On a machine without a GPU it refuses in one
sentence; `--smoke` runs every side on a tiny config on CPU (fp32, 3 steps) so the script is known to execute.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gpu.py --steps 30 --warmup 5 --batch 4
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIDES = ("vt_lora", "vt_lora_packed", "trl_lora", "vt_full", "vt_full_packed", "trl_full")
PEAKS_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
QWEN2_VL_2B = {
    "text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12}
    | {"num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "rope": [16, 24, 24],  # head_dim 128 -> 64 rotary frequencies over (time, height, width)
    "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4},
    "pixels": 448 * 448,
}
SMOKE = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    | {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "rope": [2, 3, 3],
    "vision": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
    "pixels": 112 * 112,
}


def build_model(out: Path, shape: dict) -> Path:
    """A random Qwen2-VL of `shape`, saved with the fixture tokenizer and a processor capped at shape["pixels"]."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    from visiontune.testing.vlm_fixtures import _ids, _qwen_ids, _qwen_parts, _save, _text_config

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    tok, processor = _qwen_parts([])
    processor.image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=shape["pixels"])
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": shape["rope"]}
    text = _text_config(tok, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), rope_parameters=rope)
    vision = {**shape["vision"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(text_config=text | shape["text"], vision_config=vision, **_qwen_ids(tok))
    _save(Qwen2VLForConditionalGeneration(config), processor, out, _ids(tok, "<|im_end|>", "<|endoftext|>"))
    return out


def make_data(root: Path, n: int, sizes: tuple[int, int], seed: int = 0) -> Path:
    from PIL import Image, ImageDraw

    from visiontune.testing.vlm_fixtures import corpus

    rng = random.Random(seed)
    words = [w for line in corpus() for w in line.split() if w.isalpha()]
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        w, h = rng.randint(*sizes), rng.randint(*sizes)
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(image).ellipse((w // 5, h // 5, w // 2, h // 2), fill=tuple(rng.randrange(256) for _ in "rgb"))
        image.save(root / "img" / f"{i}.png")
        messages = []
        for turn in range(rng.randint(1, 3)):
            question = " ".join(rng.choices(words, k=rng.randint(4, 16))).capitalize() + "?"
            messages.append({"role": "user", "content": ("<image>" if turn == 0 else "") + question})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(8, 60)))})
        records.append({"messages": messages, "images": [f"img/{i}.png"]})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


class Meter:
    """Wraps `trainer.training_step`: counts text tokens and model FLOPs of every batch; `stamp` at each step end."""

    def __init__(self, trainer, flops_per, gpu: bool) -> None:
        self.tokens = self.flops = 0.0
        self.stamps: list[tuple[float, float, float]] = []
        self.flops_per, self.gpu, self.inner = flops_per, gpu, trainer.training_step
        trainer.training_step = self

    def __call__(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        rows = mask.sum(-1) if mask is not None else torch_lengths(inputs)  # packed: one row of real tokens
        patches = inputs["image_grid_thw"].prod(-1).sum() if inputs.get("image_grid_thw") is not None else 0
        self.tokens += float(rows.sum())
        self.flops += self.flops_per(rows, float(patches))
        return self.inner(model, inputs, *args, **kwargs)

    def stamp(self) -> None:
        import torch

        if self.gpu:
            torch.cuda.synchronize()
        self.stamps.append((time.perf_counter(), self.tokens, self.flops))


def torch_lengths(inputs):
    return inputs["input_ids"].new_tensor([inputs["input_ids"].shape[-1]])


def flops_counter(model, lora: bool):
    """Model FLOPs of a training step on rows of `rows` text tokens with `patches` image patches (see the header)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the HF model
    inner = model.model  # Qwen2VLModel: language_model and visual
    text, vision = inner.language_model, inner.visual
    cfg = text.config
    embed = cfg.vocab_size * cfg.hidden_size
    per_token = 2 * (sum(p.numel() for p in text.parameters()) - embed + embed)  # the tied head replaces the table
    per_patch = 2 * sum(p.numel() for p in vision.parameters())
    factor = 2 if lora else 3

    def count(rows, patches: float) -> float:
        attention = sum(2 * cfg.num_hidden_layers * cfg.hidden_size * float(n) * float(n) for n in rows)
        return factor * (per_token * float(rows.sum()) + attention + per_patch * patches)

    return count


def measure(side: str, root: Path, args) -> dict:
    """One side in this (fresh) process."""
    import torch
    from transformers import TrainerCallback

    gpu = torch.cuda.is_available()
    lora = "lora" in side
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{side}-", dir=root))
    os.environ["VISIONTUNE_CACHE"] = str(root / "cache")
    if side.startswith("vt"):
        from visiontune.recipe import parse_config
        from visiontune.run.runner import make_trainer
        from visiontune.vlm.model import load_vlm
        from visiontune.vlm.sft import VlmPrepared, VlmSftTask, prepare_data

        cfg = parse_config(recipe(root, run_dir, side, args, gpu))
        model, processor = load_vlm(cfg)
        prepared = VlmPrepared(model, processor, prepare_data(cfg, processor))
        trainer = make_trainer(cfg, VlmSftTask().build(cfg, prepared, run_dir), run_dir)
    else:
        trainer = trl_trainer(root, run_dir, lora, args, gpu)
    meter = Meter(trainer, flops_counter(trainer.accelerator.unwrap_model(trainer.model), lora), gpu)

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            meter.stamp()
            if len(meter.stamps) == args.warmup and gpu:
                torch.cuda.reset_peak_memory_stats()

    trainer.add_callback(Clock())
    trainer.train()
    (w0, t0, f0), (w1, t1, f1) = meter.stamps[args.warmup - 1], meter.stamps[-1]
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    return {"side": side, "tps": (t1 - t0) / (w1 - w0), "flops_per_s": (f1 - f0) / (w1 - w0), "peak_gib": peak}


def recipe(root: Path, run_dir: Path, side: str, args, gpu: bool) -> dict:
    return {
        "task": "vlm_sft",
        "model": str(root / "model"),
        "output_dir": str(run_dir),
        "data": {"train": str(root / "data.json"), "val_split": 0, "workers": 0, "packing": side.endswith("packed")},
        "tune": {"method": "lora" if "lora" in side else "full"},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "eval_steps": 1_000_000,
            "lr": 1e-5,
            "precision": "bf16" if gpu else "fp32",
            "grad_checkpointing": True,
        },
    }


def trl_trainer(root: Path, run_dir: Path, lora: bool, args, gpu: bool):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from visiontune.recipe import parse_config

    sys.path.insert(0, str(Path(__file__).parent))
    # the same conversations in TRL's VLM layout, and the LoraConfig visiontune's defaults build (targets, merger)
    from bench_vlm_sft import trl_dataset, trl_lora_config

    cfg = parse_config(recipe(root, run_dir, "vt_lora" if lora else "vt_full", args, gpu))
    model = AutoModelForImageTextToText.from_pretrained(cfg.model)
    peft = trl_lora_config(model, cfg.tune) if lora else None
    config = SFTConfig(
        output_dir=str(run_dir),
        use_cpu=not gpu,
        bf16=gpu,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-5,
        gradient_checkpointing=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=trl_dataset(cfg),
        processing_class=AutoProcessor.from_pretrained(cfg.model),
        peft_config=peft,
    )


def peak_tflops(given: float | None) -> float | None:
    import torch

    if given:
        return given
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAKS_TFLOPS.items() if k in name), None)


def report(rows: list[dict], args, device: str, peak: float | None) -> None:
    base = {
        r["side"].replace("vt_", "").replace("trl_", "").replace("_packed", ""): r for r in rows if "trl" in r["side"]
    }
    lines = [
        f"vlm_sft on {device}, {args.shape} (random weights), batch {args.batch}, {args.steps} steps "
        f"({args.warmup} warm-up), bf16 on GPU, gradient checkpointing on",
        "",
        "| side | tokens/s | MFU | peak GiB | tokens/s vs TRL |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{r['flops_per_s'] / (peak * 1e12):.1%}" if peak else "n/a"
        trl = base.get("lora" if "lora" in r["side"] else "full")
        ratio = f"{r['tps'] / trl['tps']:.2f}x" if trl else "n/a"
        peak_gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] == r["peak_gib"] else "n/a"  # nan off a GPU
        lines.append(f"| {r['side']} | {r['tps']:.0f} | {mfu} | {peak_gib} | {ratio} |")
    print("\n".join(lines[2:]))
    print("\n<!-- markdown for BENCHMARKS.md -->\n" + "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (TFLOP/s)")
    parser.add_argument("--smoke", action="store_true", help="a tiny config on CPU, 3 steps: checks the script runs")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: measure one side in this process
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch = 3, 1, 2
    args.shape = "tiny smoke config" if args.smoke else "Qwen2-VL-2B shape"
    if args.side:  # a child: one measurement, printed as JSON
        print("RESULT " + json.dumps(measure(args.side, Path(args.root), args)))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print(
            "error: bench_gpu.py measures a GPU and none is visible here; run it on a GPU machine, or pass --smoke "
            "to check on CPU that it runs.",
            file=sys.stderr,
        )
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    build_model(root / "model", SMOKE if args.smoke else QWEN2_VL_2B)
    make_data(root, 16 if args.smoke else 256, (40, 112) if args.smoke else (224, 448))
    rows = []
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side, "--root", str(root), "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--batch", str(args.batch)] + (["--smoke"] if args.smoke else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"error: side {side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(found[-1][len("RESULT ") :]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report(rows, args, device, peak_tflops(args.peak_tflops) if torch.cuda.is_available() else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
