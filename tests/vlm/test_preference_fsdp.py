"""vlm_preference under FSDP2 (`train.fsdp`: full_shard, shard_grad_op) on two CPU ranks (gloo). Its loss encodes a
pair's images once and hands the features to the model's forward; called outside the root FSDP2 module's forward,
that encoding met DTensor shards (the vision embeddings are the root unit's, gathered only inside its call), so it
was refused. `preference_forward.within_forward` now runs the encoding inside the root's call.

Per sharding, one launch trains the built-in DPO recipe (LoRA, reference = adapters off) on the tiny Qwen2-VL fixture
for two steps and resumes it for a third; checked as every task of tests/run/test_fsdp_ranks.py is: every step
through the FSDP2-sharded model, finite losses, the same weights on both ranks, accelerate's FSDP checkpoint, a
resume that trains step 3 only, and an adapter that PEFT loads onto the plain model. An assembled VLM (init_from)
trains too, with LoRA and full tuning, launched through `--nproc 2`. Slow."""

from __future__ import annotations

import pytest

from tests import two_ranks
from tests.run import test_fsdp_ranks as fsdp  # its runner and checks (a module alias: pytest collects none twice)

fixtures_all = two_ranks.fixtures_all  # module-scoped: the tiny fixtures of every task


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["full_shard", "shard_grad_op"])
def test_vlm_preference_trains_and_resumes_under_fsdp2(fixtures_all, tmp_path, sharding):
    trained = fsdp._train(sharding, fixtures_all, tmp_path, ("vlm_preference",))
    fsdp.test_task_trains_and_resumes_under_fsdp2((fixtures_all, trained), "vlm_preference")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])  # reference: LoRA off / log-probs computed before training
def test_assembled_vlm_preference_trains_under_fsdp2(assembled_preference_world, method, write_recipe, tmp_path):
    """An assembled VLM (`init_from`: its own `image_embeds` path) under full_shard, launched as users do
    (`visiontune train RECIPE --nproc 2`): finite losses, the same weights on both ranks, one export."""
    from tests.conftest import train_two_ranks
    from tests.vlm.test_preference_assembled import _raw

    run = tmp_path / "fsdp"
    train = {"max_steps": 2, "batch_size": 2, "fsdp": "full_shard", "precision": "fp32"}
    recipe = _raw(assembled_preference_world, run, train=train, tune={"method": method})
    ranks = train_two_ranks(write_recipe(recipe))
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["samples_seen"] > 0 for r in ranks), ranks
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "the ranks ended with other weights"
    two_ranks.finite_losses(run, 2)
    assert (run / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()
    assert (run / "model" / "visiontune.json").is_file()
