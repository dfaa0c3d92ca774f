"""FSDP2 (`train.fsdp`: full_shard, shard_grad_op) for the CLIP tasks on two CPU ranks (gloo). torch's `fully_shard`
shards every parameter on dim 0 and refused CLIP's 0-dimensional `logit_scale`; the CLIP tasks now hold such scalars
as 1-element vectors while FSDP2 trains, as under DeepSpeed (clip/dual_encoder.py `hold_scalars_as_vectors`).

Per sharding, one launch trains each CLIP mode's built-in recipe on the tiny CLIP fixture for two steps (zero-shot
head full / LoRA with WiSE-FT / L-LoRA / contrastive with the temperature trainable), then resumes each run from its
checkpoint for a third. Checked as in tests/run/test_fsdp_ranks.py: every step went through an FSDP2 model whose
parameters are DTensor shards after the step, finite losses, the same weights on both ranks, accelerate's FSDP
checkpoint, a resume that trains step 3 only; and the export is what plain transformers loads, with a 0-dim
`logit_scale` (the trained one, for contrastive). Slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import two_ranks

MODES = ("full", "lora", "l_lora", "contrastive")

fixtures_clip = two_ranks.fixtures_clip  # module-scoped: the tiny CLIP fixture, images and captions


@pytest.fixture(scope="module", params=["full_shard", "shard_grad_op"])
def trained(request, fixtures_clip, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp(request.param)
    return fixtures_clip, two_ranks.train_and_resume(
        "fsdp", request.param, two_ranks.clip_runs(fixtures_clip), tmp, 1200
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_clip_mode_trains_and_resumes_under_fsdp2(trained, mode):
    fx, tmp = trained
    two_ranks.check_clip_export(two_ranks.check_resumed(tmp, mode, "fsdp"), fx, mode)
