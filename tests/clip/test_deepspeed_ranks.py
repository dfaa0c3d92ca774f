"""DeepSpeed ZeRO-2 and ZeRO-3 for the CLIP tasks on two CPU ranks (gloo). DeepSpeed's engine stopped every rank on
CLIP's 0-dimensional `logit_scale` (it broadcasts parameters viewed as bytes); the CLIP tasks now hold such scalars
as 1-element vectors while DeepSpeed trains and write them back 0-dimensional (clip/dual_encoder.py).

Per backend, one launch trains each CLIP mode's built-in recipe on the tiny CLIP fixture for two steps (zero-shot
head full / LoRA with WiSE-FT / L-LoRA (ZeRO-2; refused under ZeRO-3: tests/clip/test_deepspeed_scalars.py),
contrastive with the temperature trainable), then resumes each run from its checkpoint for a third (clip_continual:
tests/clip/test_continual_deepspeed.py). Checked as in
tests/run/test_sharded_ranks.py: every step went through DeepSpeed's engine, finite losses, the same weights on both
ranks, DeepSpeed checkpoints, a resume that trains step 3 only; and the export is what plain transformers loads,
with a 0-dim `logit_scale` (the trained one, for contrastive). Slow, and needs the `deepspeed` extra."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import two_ranks

pytest.importorskip("deepspeed")

MODES = ("full", "lora", "l_lora", "contrastive")

fixtures_clip = two_ranks.fixtures_clip  # module-scoped: the tiny CLIP fixture, images and captions


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def trained(request, fixtures_clip, tmp_path_factory) -> tuple[Path, Path]:
    runs = two_ranks.clip_runs(fixtures_clip, l_lora=request.param != "zero3")  # refused under ZeRO-3
    tmp = tmp_path_factory.mktemp(request.param)
    return fixtures_clip, two_ranks.train_and_resume("deepspeed", request.param, runs, tmp, 1200)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_clip_mode_trains_and_resumes_under_deepspeed(trained, mode):
    fx, tmp = trained
    if mode == "l_lora" and tmp.name.startswith("zero3"):
        pytest.skip("L-LoRA is refused under ZeRO-3 (no jvp for DeepSpeed's autograd functions)")
    two_ranks.check_clip_export(two_ranks.check_resumed(tmp, mode, "deepspeed"), fx, mode)
