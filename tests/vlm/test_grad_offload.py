"""train.grad_checkpointing_offload: refused where a run trains on CPU (the activations are in CPU memory already);
where a GPU trains, each checkpointed block's saved activations go through transformers' `save_on_cpu` (a spy
stands in for it here, since pinning host memory needs CUDA)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image

from visiontune.core.errors import RecipeError
from visiontune.recipe import parse_config
from visiontune.vlm.model import apply_tuning, enable_grad_checkpointing, load_vlm


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from visiontune.testing.vlm_fixtures import tiny_vlm

    return tiny_vlm("llava", tmp_path_factory.mktemp("llava"))


def _config(model, task: str = "vlm_sft", **train) -> object:
    recipe = {"task": task, "model": str(model), "output_dir": "unused", "data": {"train": "x"}}
    return parse_config({**recipe, "train": train})


def test_refused_on_cpu(llava, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="this run trains on CPU, where they already are"):
        _config(llava, grad_checkpointing=True, grad_checkpointing_offload=True)
    with pytest.raises(RecipeError, match="acts only with train.grad_checkpointing: true"):
        _config(llava, grad_checkpointing_offload=True)


@pytest.mark.parametrize("task", ["vlm_sft", "vlm_preference"])
@pytest.mark.parametrize("offload", [False, True])
def test_offload_reaches_the_checkpointed_blocks(llava, monkeypatch, task, offload):
    import transformers.modeling_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    extra = {"grad_checkpointing_offload": True} if offload else {}
    cfg = _config(llava, task, grad_checkpointing=True, **extra)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the model itself runs here, on CPU
    calls: list[dict] = []

    def spy(**kwargs):
        calls.append(kwargs)
        return contextlib.nullcontext()

    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu", spy)
    model, processor = load_vlm(cfg)
    model = apply_tuning(model, cfg.tune)
    enable_grad_checkpointing(model)  # as the tasks call it: the offload comes from the loaded model
    model.train()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    text = processor.apply_chat_template(messages)
    batch = dict(processor(text=[text], images=[Image.new("RGB", (32, 32), "red")], return_tensors="pt"))
    model(**batch, labels=batch["input_ids"]).loss.backward()
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(calls) == (len(blocks) if offload else 0) and blocks  # once per checkpointed block


def test_offload_given_explicitly(monkeypatch):
    """vlm_assemble passes the key itself (its language model is not loaded by load_vlm)."""
    import transformers.modeling_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    calls: list[dict] = []
    monkeypatch.setattr(
        transformers.modeling_utils, "save_on_cpu", lambda **kw: calls.append(kw) or contextlib.nullcontext()
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
    )
    lm = LlamaForCausalLM(config)
    enable_grad_checkpointing(lm, offload=True)
    lm.train()
    ids = torch.randint(0, 64, (1, 8))
    lm(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 3
