"""train.grad_checkpointing in vlm_sft: the same loss and gradients as without it, for LoRA and full tuning."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from visiontune.recipe import parse_config
from visiontune.vlm.model import apply_tuning, enable_grad_checkpointing, load_vlm


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from visiontune.testing.vlm_fixtures import tiny_vlm

    return tiny_vlm("llava", tmp_path_factory.mktemp("llava"))


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpointing_keeps_loss_and_gradients(llava, method):
    cfg = parse_config(
        {
            "task": "vlm_sft",
            "model": str(llava),
            "output_dir": "unused",
            "data": {"train": "x"},
            "tune": {"method": method, **({"lora_dropout": 0.0} if method == "lora" else {})},
        }
    )
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, processor = load_vlm(cfg)
        model = apply_tuning(model, cfg.tune)
        if checkpointing:
            enable_grad_checkpointing(model)
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            assert base.is_gradient_checkpointing
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ]
        text = processor.apply_chat_template(messages)
        batch = dict(processor(text=[text], images=[Image.new("RGB", (32, 32), "red")], return_tensors="pt"))
        batch["labels"] = batch["input_ids"].clone()
        runs.append(_loss_and_grads(model, batch))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name
