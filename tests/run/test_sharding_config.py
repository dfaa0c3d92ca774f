"""`train.fsdp` and `train.deepspeed` where they cannot act: refused in one sentence when the recipe is read. Both at
once, and bf16/fp16 with DeepSpeed on CPU (transformers allows them there only with use_cpu, which turns DeepSpeed
off); FSDP2 on one CPU process (nothing to shard over) before the run folder. `train.fsdp` reaches TrainingArguments
as an FSDP2 config; on CPU ranks it trains (tests/run/test_fsdp_ranks.py)."""

from __future__ import annotations

import pytest
import torch

from visiontune.core.errors import RecipeError
from visiontune.recipe import parse_config
from visiontune.run import arguments


def _train(**train) -> object:
    recipe = {"task": "classify", "model": "unused", "output_dir": "unused", "data": {"train": "x"}}
    return parse_config({**recipe, "train": train}).train


@pytest.mark.parametrize("value", ["full_shard", "shard_grad_op"])
def test_fsdp_on_cpu_needs_several_ranks(monkeypatch, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train = _train(fsdp=value)  # accepted when read: FSDP2 trains on CPU ranks
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RecipeError) as err:
        arguments.check_deepspeed(train)
    assert "train.fsdp on CPU needs several ranks: launch with `visiontune train RECIPE --nproc 2`" in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    arguments.check_deepspeed(train)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU run: one process is accelerate's to judge
    monkeypatch.delenv("WORLD_SIZE")
    arguments.check_deepspeed(_train(fsdp=value))


def test_fsdp_and_deepspeed_together_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RecipeError, match="train.fsdp and train.deepspeed both shard the model; keep one"):
        _train(fsdp="full_shard", deepspeed="zero3")


def test_fsdp1_policy_strings_are_refused():
    with pytest.raises(RecipeError, match="train.fsdp"):
        _train(fsdp="full_shard auto_wrap")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_with_deepspeed_on_cpu_is_refused(monkeypatch, precision):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError) as err:
        _train(deepspeed="zero2", precision=precision)
    assert f"train.precision: {precision} with train.deepspeed needs GPUs" in str(err.value)
    assert _train(deepspeed="zero2", precision="fp32").deepspeed == "zero2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _train(deepspeed="zero2", precision=precision).precision == precision  # GPUs: DeepSpeed's own bf16


@pytest.mark.parametrize(("value", "reshard"), [("full_shard", True), ("shard_grad_op", False)])
def test_fsdp_reaches_training_arguments_as_fsdp2(monkeypatch, tmp_path, value, reshard):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train = _train(fsdp=value)
    seen = {}
    monkeypatch.setattr(arguments, "TrainingArguments", lambda **kwargs: seen.update(kwargs))
    arguments.training_arguments(train, tmp_path, 0, 0, [])
    assert seen["fsdp"] is True
    assert seen["fsdp_config"] == {"version": 2, "reshard_after_forward": reshard}
    arguments.training_arguments(_train(), tmp_path, 0, 0, [])
    assert seen["fsdp"] is False and seen["fsdp_config"] is None


def test_zero3_is_refused_for_clip_continual():
    # the next task's zero-shot head met the partitioned text tower (seen on two CPU ranks); ZeRO-2 trains the
    # sequence: tests/clip/test_continual_deepspeed.py
    recipe = {"task": "clip_continual", "model": "unused", "output_dir": "unused", "train": {"deepspeed": "zero3"}}
    recipe |= {"tasks": [{"name": "a", "train": "x"}, {"name": "b", "train": "y"}]}
    with pytest.raises(RecipeError, match="train.deepspeed: zero3 cannot train clip_continual: ZeRO-3 partitions"):
        parse_config(recipe)
    assert parse_config({**recipe, "train": {"deepspeed": "zero2"}}).train.deepspeed == "zero2"


def test_fsdp_is_refused_for_clip_continual():
    # seen on two CPU ranks: after the first task the sharded model met the between-task evaluation and checkpoint;
    # clip_classify and clip_contrastive train under FSDP2: tests/clip/test_fsdp_ranks.py
    recipe = {"task": "clip_continual", "model": "unused", "output_dir": "unused", "train": {"fsdp": "full_shard"}}
    recipe |= {"tasks": [{"name": "a", "train": "x"}, {"name": "b", "train": "y"}]}
    with pytest.raises(RecipeError, match="train.fsdp cannot train clip_continual: FSDP2 shards the shared model"):
        parse_config(recipe)


def test_fsdp_is_accepted_for_vlm_preference():
    # its loss encodes the images inside the root FSDP2 module's call (tests/vlm/test_preference_fsdp.py)
    recipe = {"task": "vlm_preference", "model": "unused", "output_dir": "unused", "data": {"train": "x"}}
    assert parse_config({**recipe, "train": {"fsdp": "full_shard"}}).train.fsdp == "full_shard"


def test_ema_with_fsdp_is_refused():
    with pytest.raises(RecipeError, match="train.ema cannot average FSDP2 shards"):
        _train(fsdp="full_shard", ema={"decay": 0.9})
    assert _train(ema={"decay": 0.9}).ema.decay == 0.9
