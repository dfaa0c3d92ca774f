"""Memory options side by side: peak memory and seconds per training step of each, on one VLM, on this CPU.

The model is the LLaVA fixture of `visiontune.testing.vlm_fixtures` (its tokenizer, template, processor and tiny CLIP
tower) with the language model scaled up to a small real shape: Llama, hidden 512, 4 layers, MLP 1536, 8 heads
(4 KV heads) — about 13M parameters, every Linear a multiple of 64 as bitsandbytes' CPU kernels need. Built once,
saved to a temp folder; every option loads it from there through `load_vlm` (the code `visiontune train` runs).

Each option is a recipe (`tune` / `train` keys) taken through visiontune's own pieces: `parse_config` ->
`load_vlm` (tune.dtype, tune.qlora_bits, train.precision's 4-bit compute dtype) -> `apply_tuning` (full or LoRA
r 16 on every Linear of the language model; QLoRA through PEFT's k-bit preparation) ->
`enable_grad_checkpointing` -> `run.optim.build_optimizer` (train.optimizer) -> forward, backward and optimiser step
on one fixed batch (2 conversations of ~150 tokens and one 32-px image each), under `torch.autocast` in bf16 when
train.precision is bf16 (as the Trainer's autocast does).

Reported per option, each in a fresh process (so one option's allocations never count against another's):
* weights MB: parameters + buffers as loaded (quantised layers at their packed size);
* optimiser MB: the optimiser's state tensors after the last step;
* load peak MB: the process's peak resident memory (VmHWM) while importing, loading and tuning the model;
* train peak MB: the peak resident memory of the training steps alone (the peak is reset once the model, batch and
  optimiser are built: /proc/self/clear_refs); "train delta" subtracts the resident memory at that reset (what
  training added: gradients, activations, optimiser state, allocator slack);
* s/step: median wall seconds of the timed steps (after `--warmup` untimed ones).
Ratios are against the baseline of the same tuning family measured in the same run: full fp32 AdamW for the full
options, LoRA fp32 for the quantised ones.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --steps 4 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}

# name -> (recipe sections, baseline name)
OPTIONS: dict[str, tuple[dict, str]] = {
    "full fp32 (baseline)": ({"tune": {"method": "full"}}, "full fp32 (baseline)"),
    "full, bf16 weights": ({"tune": {"method": "full", "dtype": "bf16"}}, "full fp32 (baseline)"),
    "full, bf16 autocast": ({"tune": {"method": "full"}, "train": {"precision": "bf16"}}, "full fp32 (baseline)"),
    "full, adamw_8bit": ({"tune": {"method": "full"}, "train": {"optimizer": "adamw_8bit"}}, "full fp32 (baseline)"),
    "full, grad checkpointing": (
        {"tune": {"method": "full"}, "train": {"grad_checkpointing": True}},
        "full fp32 (baseline)",
    ),
    "lora fp32 (baseline)": ({"tune": {"method": "lora"}}, "lora fp32 (baseline)"),
    "lora, bf16 weights": ({"tune": {"method": "lora", "dtype": "bf16"}}, "lora fp32 (baseline)"),
    "qlora 8-bit": ({"tune": {"method": "qlora", "qlora_bits": 8}}, "lora fp32 (baseline)"),
    "qlora 4-bit, fp32 compute": ({"tune": {"method": "qlora"}}, "lora fp32 (baseline)"),
    "qlora 4-bit, bf16 compute": (
        {"tune": {"method": "qlora"}, "train": {"precision": "bf16"}},
        "lora fp32 (baseline)",
    ),
}


def build_model(out: Path) -> Path:
    from visiontune.testing import vlm_fixtures

    vlm_fixtures.TEXT.update(SHAPE)  # the fixture's text tower, at the benchmark's shape
    return vlm_fixtures.tiny_vlm("llava", out)


def batch(processor, n: int = 2):
    from PIL import Image

    words = "the red square sits left of a blue circle and a green line runs under both".split()
    answer = " ".join(words[i % len(words)] for i in range(120))
    texts, images = [], []
    for i in range(n):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe picture {i}."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        texts.append(processor.apply_chat_template(messages))
        images.append(Image.new("RGB", (32, 32), (40 * i, 90, 200)))
    inputs = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since start or the last reset) of this process, Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(model_dir: Path, name: str, steps: int, warmup: int) -> dict:
    """One option in this process: load, tune, train `warmup + steps` steps on one batch."""
    import contextlib

    import torch

    from visiontune.recipe import parse_config
    from visiontune.run.optim import build_optimizer
    from visiontune.vlm.model import apply_tuning, enable_grad_checkpointing, load_vlm

    sections, _ = OPTIONS[name]
    recipe = {"task": "vlm_sft", "model": str(model_dir), "output_dir": "unused", "data": {"train": "x"}}
    cfg = parse_config({**recipe, **sections})
    torch.manual_seed(0)
    model, processor = load_vlm(cfg)
    model = apply_tuning(model, cfg.tune)
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(model)
    weights = tensor_mb([*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, optimizer=cfg.train.optimizer)
    inputs = batch(processor)
    gc.collect()
    load_peak = status_mb("VmHWM")
    reset_peak()
    loaded = status_mb("VmRSS")
    bf16 = cfg.train.precision == "bf16"
    model.train()
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    peak = status_mb("VmHWM")
    return {
        "option": name,
        "trainable_m": trainable / 1e6,
        "weights_mb": weights,
        "optimizer_mb": tensor_mb(state),
        "load_peak_mb": load_peak,
        "peak_rss_mb": peak,
        "train_delta_mb": peak - loaded,
        "s_per_step": statistics.median(times),
        "tokens": int(inputs["input_ids"].numel()),
        "losses": losses,
    }


def table(rows: list[dict]) -> str:
    by_name = {r["option"]: r for r in rows}
    lines = [
        "| option | trainable M | weights MB | optimiser MB | load peak MB | train peak MB | train delta MB | "
        "s/step | delta / baseline | s/step / baseline |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        base = by_name.get(OPTIONS[r["option"]][1], r)
        lines.append(
            f"| {r['option']} | {r['trainable_m']:.2f} | {r['weights_mb']:.0f} | {r['optimizer_mb']:.0f} | "
            f"{r['load_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['train_delta_mb']:.0f} | {r['s_per_step']:.2f} | "
            f"{r['train_delta_mb'] / base['train_delta_mb']:.2f} | {r['s_per_step'] / base['s_per_step']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=list(OPTIONS), help="options to run (names from OPTIONS)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one option
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Path(args.model), args.one, args.steps, args.warmup)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "llava-13m")
        rows = []
        for name in args.only:
            cmd = [sys.executable, __file__, "--one", name, "--model", str(model_dir)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{name}: {r['s_per_step']:.2f} s/step, train delta {r['train_delta_mb']:.0f} MB", file=sys.stderr)
    print(table(rows))
    print(f"\ntokens per batch: {rows[0]['tokens']}; threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")


if __name__ == "__main__":
    main()
