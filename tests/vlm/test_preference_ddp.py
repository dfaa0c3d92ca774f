"""vlm_preference on two DDP ranks (CPU, gloo): they train in step and export once, although the pair forward
encodes images outside DDP's forward and the reference switches the adapters off on the unwrapped model."""

from tests.conftest import train_two_ranks
from tests.vlm.test_preference_run import _cache, _recipe, world  # noqa: F401, F811 - fixtures shared with the resume test


def test_two_ranks_train_in_step_and_export_once(world, write_recipe, tmp_path):  # noqa: F811
    ranks = train_two_ranks(write_recipe(_recipe(world, tmp_path / "ddp", epochs=1)))
    # 9 training pairs, 2 per rank and step: 3 steps each (accelerate evens out the last batch)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["samples_seen"] for r in ranks] == [6, 6]
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "ranks ended with different weights"
    run = tmp_path / "ddp"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "report.md").is_file()
