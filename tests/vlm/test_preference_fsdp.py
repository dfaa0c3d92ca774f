"""vlm_preference under FSDP2 (`train.fsdp`: full_shard, shard_grad_op) on two CPU ranks (gloo). Its loss encodes a
pair's images once and hands the features to the model's forward; called outside the root FSDP2 module's forward,
that encoding met DTensor shards (the vision embeddings are the root unit's, gathered only inside its call), so it
was refused. `preference_forward.within_forward` now runs the encoding inside the root's call.

Per sharding, one launch trains the built-in DPO recipe (LoRA, reference = adapters off) on the tiny Qwen2-VL fixture
for two steps and resumes it for a third; checked as every task of tests/run/test_fsdp_ranks.py is: every step
through the FSDP2-sharded model, finite losses, the same weights on both ranks, accelerate's FSDP checkpoint, a
resume that trains step 3 only, and an adapter that PEFT loads onto the plain model. Slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.run import test_fsdp_ranks as fsdp  # its runner and checks (a module alias: pytest collects none twice)


@pytest.fixture(scope="module")
def fixtures_all(tmp_path_factory) -> Path:
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import write_everything

    out = tmp_path_factory.mktemp("preference-fsdp-fixtures")
    with fixture_seed():
        write_everything(out / "fx")
    return out / "fx"


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["full_shard", "shard_grad_op"])
def test_vlm_preference_trains_and_resumes_under_fsdp2(fixtures_all, tmp_path, sharding):
    trained = fsdp._train(sharding, fixtures_all, tmp_path, ("vlm_preference",))
    fsdp.test_task_trains_and_resumes_under_fsdp2((fixtures_all, trained), "vlm_preference")
