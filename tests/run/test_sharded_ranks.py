"""DeepSpeed ZeRO-2 and ZeRO-3 for real, on two CPU ranks (gloo), for every task that takes them (the CLIP tasks:
tests/clip/test_deepspeed_ranks.py; FSDP2: tests/run/test_fsdp_ranks.py). Per backend, one
launch trains each task's built-in recipe on the tiny fixtures for two steps, then resumes each run from its
checkpoint for a third. Checked: every training step went through DeepSpeed's engine (before the fix transformers
trained plain DDP without a word), finite losses, the same weights on both ranks (ZeRO-3: gathered), one export with
whole tensors, DeepSpeed checkpoints, and a resume that continues at step 3. VLM data mixing text-only and image
records (where ZeRO-3 peers hung and ZeRO-2's gradient reduce failed before the stand-in image):
tests/vlm/test_mixed_batches.py. Slow (DeepSpeed builds its CPU comm op on a first run) and needs the `deepspeed`
extra."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import two_ranks

pytest.importorskip("deepspeed")

TASKS = ("classify", "detect", "segment", "vlm_sft", "vlm_preference", "vlm_assemble")

fixtures_all = two_ranks.fixtures_all  # module-scoped: the tiny fixtures of every task


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def trained(request, fixtures_all, tmp_path_factory) -> tuple[str, Path]:
    tmp = tmp_path_factory.mktemp(request.param)
    return request.param, two_ranks.train_and_resume(
        "deepspeed", request.param, two_ranks.task_runs(fixtures_all), tmp, 1500
    )


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_task_trains_and_resumes_under_deepspeed(trained, task):
    _, tmp = trained
    run = two_ranks.check_resumed(tmp, task, "deepspeed")
    two_ranks.whole_tensors(two_ranks.export(run))  # a ZeRO-3 shard saved as is would be empty
