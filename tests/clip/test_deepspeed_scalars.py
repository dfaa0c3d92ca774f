"""CLIP's 0-dim `logit_scale` is held as a 1-element vector while DeepSpeed trains (its engine cannot broadcast a 0-dim
parameter); the model computes the same, and the export is 0-dim again. The runs under DeepSpeed:
tests/clip/test_deepspeed_ranks.py."""

import pytest
import torch

from visiontune.core.errors import RecipeError
from visiontune.recipe import parse_config


def _batch(encoder) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    texts = encoder.tokenize(["a red image", "a green image", "a blue image"])
    return {"pixel_values": torch.randn(3, 3, 32, 32), **texts}


def test_held_scale_computes_the_same_and_exports_0_dim(fixtures_dir, tmp_path):
    from safetensors import safe_open
    from transformers import CLIPModel

    from visiontune.clip.contrastive import ContrastiveModel
    from visiontune.clip.dual_encoder import hold_scalars_as_vectors, resolve_dual_encoder

    encoder = resolve_dual_encoder(str(fixtures_dir / "clip"))
    encoder.model.logit_scale.data.fill_(2.5)  # not the fixture's value, so the export must carry this one
    model = ContrastiveModel(encoder).eval()
    before = model(**_batch(encoder))
    assert hold_scalars_as_vectors(encoder.model) == ["logit_scale"]
    assert encoder.model.logit_scale.shape == (1,) and encoder.model.logit_scale.requires_grad
    after = model(**_batch(encoder))
    assert torch.equal(before["logits"], after["logits"]) and torch.equal(before["loss"], after["loss"])

    encoder.save(tmp_path / "model")
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        assert f.get_slice("logit_scale").get_shape() == []
    plain = CLIPModel.from_pretrained(tmp_path / "model").logit_scale
    assert plain.dim() == 0 and float(plain) == 2.5
    assert encoder.model.logit_scale.shape == (1,)  # saving leaves the training model as it was


def test_l_lora_is_refused_under_zero3_only():
    # L-LoRA's jvp runs through ZeRO-3's autograd functions, which have none (seen on two CPU ranks); ZeRO-2 trains it
    recipe = {"task": "clip_classify", "model": "unused", "output_dir": "unused", "data": {"train": "x"}}
    recipe |= {"tune": {"method": "l_lora"}}
    with pytest.raises(RecipeError, match="tune.method: l_lora cannot train under ZeRO-3: L-LoRA's forward-mode"):
        parse_config(recipe | {"train": {"deepspeed": "zero3"}})
    assert parse_config(recipe | {"train": {"deepspeed": "zero2"}}).train.deepspeed == "zero2"
