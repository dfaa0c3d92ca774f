"""vlm_sft's memory options at load time: `tune.dtype` (weights in bf16 / fp16), `tune.qlora_bits: 8` (LLM.int8
next to 4-bit nf4) and the 4-bit compute dtype following `train.precision`; each trains two steps on a fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visiontune.recipe import parse_config
from visiontune.vlm.model import load_vlm

pytest.importorskip("bitsandbytes")


def _config(model: Path, **sections: dict) -> object:
    recipe = {"task": "vlm_sft", "model": str(model), "output_dir": "unused", "data": {"train": "x"}}
    return parse_config({**recipe, **sections})


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_weights_load_in_the_recipes_dtype(qwen2_vl, dtype, torch_dtype):
    model, _ = load_vlm(_config(qwen2_vl, tune={"method": "lora", "dtype": dtype}))
    assert {p.dtype for p in model.parameters()} == {torch_dtype}
    auto, _ = load_vlm(_config(qwen2_vl, tune={"method": "lora"}))
    assert {p.dtype for p in auto.parameters()} == {torch.float32}  # the fixture was saved in fp32


def test_auto_keeps_the_checkpoints_dtype_and_fp32_upcasts(qwen2_vl, tmp_path):
    """Hub VLMs are saved in bf16: `auto` (transformers' default) keeps that, `fp32` gives fp32 weights."""
    import shutil

    saved = tmp_path / "bf16"
    model, _ = load_vlm(_config(qwen2_vl, tune={"method": "lora", "dtype": "bf16"}))
    model.save_pretrained(saved)
    for f in qwen2_vl.iterdir():
        if not (saved / f.name).exists():
            shutil.copy(f, saved / f.name)  # the processor's files
    for dtype, expected in (("auto", torch.bfloat16), ("fp32", torch.float32)):
        loaded, _ = load_vlm(_config(saved, tune={"method": "lora", "dtype": dtype}))
        assert {p.dtype for p in loaded.parameters()} == {expected}, dtype


@pytest.mark.parametrize(
    ("bits", "precision", "expected"),
    [(4, "fp32", torch.float32), (4, "bf16", torch.bfloat16), (4, "fp16", torch.float16), (8, "bf16", None)],
)
def test_quantization_config_follows_the_recipe(qwen2_vl, monkeypatch, bits, precision, expected):
    """What the loader hands transformers (a spy on from_pretrained), and the layers it gets back."""
    from transformers import AutoModelForImageTextToText

    seen: dict = {}
    real = AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy)
    train = {"precision": precision}
    model, _ = load_vlm(_config(qwen2_vl, tune={"method": "qlora", "qlora_bits": bits}, train=train))
    q = seen["quantization_config"]
    assert (q.load_in_4bit, q.load_in_8bit) == (bits == 4, bits == 8)
    if bits == 4:
        assert q.bnb_4bit_compute_dtype == expected
    layers = {type(m).__name__ for n, m in model.named_modules() if n.startswith("model.language_model.")}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in layers
    visual = {type(m).__name__ for n, m in model.named_modules() if n.startswith("model.visual.")}
    assert not visual & {"Linear4bit", "Linear8bitLt"}  # the vision tower and projector stay unquantised


def test_keys_refused_where_they_cannot_act(qwen2_vl):
    with pytest.raises(Exception, match="tune.qlora_bits acts only with tune.method: qlora"):
        _config(qwen2_vl, tune={"method": "lora", "qlora_bits": 8})
    with pytest.raises(Exception, match="tune.dtype acts only with tune.method full or lora"):
        _config(qwen2_vl, tune={"method": "qlora", "dtype": "bf16"})
    with pytest.raises(Exception, match="fp16 weights with no loss scaling"):
        _config(qwen2_vl, tune={"method": "full", "dtype": "fp16"})


@pytest.mark.parametrize(
    ("tune", "train"),
    [
        ({"method": "qlora", "qlora_bits": 8}, {}),
        ({"method": "qlora"}, {"precision": "bf16"}),
        ({"method": "lora", "dtype": "bf16"}, {"precision": "bf16"}),
        ({"method": "lora", "dtype": "fp16"}, {"precision": "fp16"}),
        ({"method": "full", "dtype": "bf16"}, {}),
    ],
    ids=["8bit", "4bit-bf16-compute", "lora-bf16-weights", "lora-fp16-weights", "full-bf16-weights"],
)
def test_two_training_steps(qwen2_vl, conversations, tmp_path, write_recipe, cli, monkeypatch, tune, train):
    """The run trains: a finite loss logged at each of the two optimiser steps."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    recipe = {
        "task": "vlm_sft",
        "model": str(qwen2_vl),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(conversations), "val_split": 0, "max_length": 256},
        "tune": tune,
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "logging_steps": 1, **train},
    }
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert list(losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(losses.values())))), rows
