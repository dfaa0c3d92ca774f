"""Quantised layers stay trainable through evaluation (vlm/quantized.py), on any CPU.

bitsandbytes repacks 4-bit weights for inference only on a CPU with AVX-512 BF16; the tests pretend every CPU has it
(the per-layer flag) and spy on the repack, so they check the same thing on a CPU without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from visiontune.vlm.quantized import four_bit_layers, is_packed, keep_trainable_layout

bnb = pytest.importorskip("bitsandbytes")
DIM = 64  # bitsandbytes' CPU packing needs out_features % 32 == 0 and 64-element blocks


class _Block(nn.Module):
    def __init__(self, linear: nn.Module):
        super().__init__()
        self.q_proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.q_proj(x))


class _Stack(nn.Module):
    """Frozen embeddings and three quantised blocks: the first block's input has no grad, as under LoRA."""

    def __init__(self, bits: int, bias: bool):
        super().__init__()
        self.emb = nn.Embedding(16, DIM)
        self.layers = nn.ModuleList(_Block(_linear(bits, bias)) for _ in range(3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return x


def _linear(bits: int, bias: bool) -> nn.Module:
    if bits == 8:
        return bnb.nn.Linear8bitLt(DIM, DIM, bias=bias, has_fp16_weights=False)
    return bnb.nn.Linear4bit(DIM, DIM, bias=bias, compute_dtype=torch.float32, quant_type="nf4")


def _lora_stack(bits: int, bias: bool = True, fix: bool = True) -> nn.Module:
    """QLoRA as vlm_sft builds it, on a CPU that says it has AVX-512 BF16; `fix` applies keep_trainable_layout."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    stack = _Stack(bits, bias).to("cpu")  # .to() quantises
    for p in stack.parameters():
        p.requires_grad_(False)
    for layer in four_bit_layers(stack):
        layer.support_avx512bf16_for_cpu = True
    if fix:
        keep_trainable_layout(stack)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], init_lora_weights=False)
    return get_peft_model(stack, config)  # random lora_B, so every adapter's A and B get a gradient


def _evaluate(model: nn.Module, ids: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(ids)


def _grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model(ids).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def repacks(monkeypatch) -> list[nn.Module]:
    """Records bitsandbytes' inference repack instead of doing it (its kernel needs AVX-512 BF16)."""
    calls: list = []

    def spy(weight, quant_state, *args, **kwargs):
        calls.append(quant_state)
        return weight, quant_state

    monkeypatch.setattr(bnb.nn.modules, "_convert_weight_packed_for_cpu", spy)
    return calls


IDS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


def test_bitsandbytes_repacks_4bit_weights_in_eval_mode(repacks):
    """The bitsandbytes behaviour keep_trainable_layout counters: if this fails after an upgrade, re-read
    `Linear4bit.forward` and update vlm/quantized.py."""
    model = _lora_stack(4, fix=False)
    _evaluate(model, IDS)
    assert len(repacks) == 3


def test_a_trainable_model_is_never_repacked(repacks):
    model = _lora_stack(4)
    _evaluate(model, IDS)
    _grads(model, IDS)
    _evaluate(model, IDS)
    assert repacks == []
    layers = four_bit_layers(model)
    assert len(layers) == 3 and not any(is_packed(layer) or layer.support_avx512bf16_for_cpu for layer in layers)


@pytest.mark.parametrize(("bits", "bias"), [(4, True), (4, False), (8, True)])
def test_every_adapter_gets_the_same_gradients_after_an_evaluation(bits, bias):
    """Eval -> train computes what train alone does, for every LoRA matrix of every layer (unfixed, on AVX-512 BF16:
    with bias the step fails, without it earlier layers get wrong gradients). 8-bit layers need no fix: they choose
    their matmul from `training` on each call."""
    expected = _grads(_lora_stack(bits, bias, fix=bits == 4), IDS)
    model = _lora_stack(bits, bias, fix=bits == 4)
    _evaluate(model, IDS)
    got = _grads(model, IDS)
    assert len(got) == 6 and got.keys() == expected.keys()  # lora_A and lora_B of 3 layers
    for name, grad in got.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_a_layer_packed_before_the_fix_is_unpacked():
    """A layer already in the inference layout (evaluated before keep_trainable_layout) goes back to the training
    layout, with the same outputs up to bitsandbytes' absmax rounding."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = _lora_stack(4, fix=False).train()
    before = model(IDS).detach()
    for layer in four_bit_layers(model):
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state
        )
    assert all(is_packed(layer) for layer in four_bit_layers(model))
    keep_trainable_layout(model)
    assert not any(is_packed(layer) for layer in four_bit_layers(model))
    assert torch.allclose(model(IDS), before, atol=2e-2)


# The real thing: the Qwen2-VL fixture (q/k/v with bias; tests/vlm/conftest.py) through vlm_sft with QLoRA.


def _qlora_config(model: Path) -> object:
    from visiontune.recipe import parse_config

    recipe = {"task": "vlm_sft", "model": str(model), "output_dir": "unused", "data": {"train": "x"}}
    return parse_config({**recipe, "tune": {"method": "qlora"}})


def test_qlora_model_is_built_trainable(qwen2_vl):
    from visiontune.vlm.model import apply_tuning, load_vlm

    cfg = _qlora_config(qwen2_vl)
    model, _ = load_vlm(cfg)
    layers = four_bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as on a CPU with AVX-512 BF16
    model = apply_tuning(model, cfg.tune)
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(model))


def test_qlora_training_updates_every_adapter(qwen2_vl, conversations, tmp_path, write_recipe, cli, monkeypatch):
    """Evaluation before and after training, and the adapter saved after it: every lora_B (zero at the start) moved."""
    from safetensors.torch import load_file

    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    recipe = {
        "task": "vlm_sft",
        "model": str(qwen2_vl),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(conversations), "val_split": 0.34, "max_length": 256},
        "eval": {"max_new_tokens": 2},
        "tune": {"method": "qlora", "lora_target": "all"},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3},
    }
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    n_layers = json.loads((qwen2_vl / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert len(lora_b) == 7 * n_layers  # q, k, v, o, gate, up, down in every decoder layer
    assert all(w.abs().sum() > 0 for w in lora_b.values()), [n for n, w in lora_b.items() if not w.abs().sum()]


def test_a_4bit_model_saved_after_evaluation_reloads(qwen2_vl, conversations, tmp_path):
    """Eval-only use (`visiontune eval` / `compare`) may repack for speed; saving afterwards still writes the
    training layout (bitsandbytes unpacks in `_save_to_state_dict`), and the folder loads back to the same model."""
    from visiontune.vlm.conversations import read_conversations
    from visiontune.vlm.generate import generation_report, load_trained
    from visiontune.vlm.model import load_vlm

    model, processor = load_vlm(_qlora_config(qwen2_vl))
    batch = _batch(processor)
    before = _logits(model, batch)
    generation_report(model, processor, read_conversations(str(conversations))[:2], ["exact_match"], 2, 32 * 32)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded, _ = load_trained(str(tmp_path / "saved"))
    assert four_bit_layers(reloaded) and not any(is_packed(layer) for layer in four_bit_layers(reloaded))
    assert torch.allclose(_logits(reloaded, batch), before, atol=1e-2)


def _batch(processor) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    text = processor.apply_chat_template(messages)
    return dict(processor(text=[text], images=[Image.new("RGB", (32, 32), "red")], return_tensors="pt"))


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    model.train()  # train mode never repacks
    with torch.no_grad():
        return model(**batch).logits
