"""Under DeepSpeed a batch without images next to one with images stops every rank (ZeRO-3: each waits in another
module's parameter gather; ZeRO-2: gloo's collective mismatch in the gradient reduce; both reproduced on two CPU
ranks): such data is refused in one sentence naming a record, before any rank trains. Data with images everywhere,
or none anywhere, and training without DeepSpeed go through."""

from types import SimpleNamespace

import pytest

from visiontune.core.errors import DataError
from visiontune.run.config import TrainConfig
from visiontune.vlm.mixed_batches import refuse_text_only


def _records(*images: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(images=["x.png"] * n, ref=f"data.json record {i}") for i, n in enumerate(images)]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_mixed_records_are_refused_under_deepspeed(stage):
    with pytest.raises(DataError) as err:
        refuse_text_only(TrainConfig(deepspeed=stage), _records(1, 0, 1, 0))
    assert str(err.value).startswith("data.json record 1 has no image, and under train.deepspeed a batch without")
    assert "(2 of 4 records have none); train without train.deepspeed, or give every record an image." in str(err.value)


def test_mixed_records_pass_without_deepspeed():
    refuse_text_only(TrainConfig(), _records(1, 0))


def test_uniform_records_pass_under_deepspeed():
    refuse_text_only(TrainConfig(deepspeed="zero3"), _records(1, 2, 1))
    refuse_text_only(TrainConfig(deepspeed="zero3"), _records(0, 0))  # text only: the vision tower never runs


def test_mixed_images_means_both_kinds():
    from visiontune.vlm.mixed_batches import mixed_images

    assert mixed_images(_records(1, 0)) and not mixed_images(_records(1, 2)) and not mixed_images(_records(0, 0))


@pytest.mark.slow
def test_ddp_trains_mixed_batches(tmp_path, write_recipe):
    """Two gloo ranks, batch 1, records alternating with and without an image: without DDP told that the vision
    path may go unused on a rank, the ranks waited for each other in the gradient all-reduce until killed."""
    import json

    from PIL import Image

    from tests.conftest import train_two_ranks
    from visiontune.testing.vlm_fixtures import tiny_vlm

    records = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 30))] * 4):
        Image.new("RGB", (40, 30), rgb).save(tmp_path / f"{i}.png")
        question = "<image>What colour is this?" if i % 2 == 0 else "Say a colour."
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": name}]
        records.append({"messages": turns, **({"images": [f"{i}.png"]} if i % 2 == 0 else {})})
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = {
        "task": "vlm_sft",
        "model": str(tiny_vlm("qwen2_vl", tmp_path / "vlm")),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "data.json"), "val_split": 0, "max_length": 256, "group_by_length": False},
        "train": {"max_steps": 3, "batch_size": 1, "logging_steps": 1},
    }
    ranks = train_two_ranks(write_recipe(recipe))
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"]
    assert [r["samples_seen"] for r in ranks] == [3, 3]


@pytest.mark.slow
def test_ddp_trains_mixed_preference_pairs(tmp_path, write_recipe):
    """The same for vlm_preference: pairs whose prompts alternate with and without an image, two ranks, batch 1."""
    import json

    from PIL import Image

    from tests.conftest import train_two_ranks
    from visiontune.testing.fixtures import preference_pairs
    from visiontune.testing.vlm_fixtures import tiny_vlm

    convs = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 30))] * 4):
        Image.new("RGB", (40, 30), rgb).save(tmp_path / f"{i}.png")
        question = "<image>What colour is this?" if i % 2 == 0 else "Say a colour."
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": name}]
        convs.append({"messages": turns, "images": [f"{i}.png"] if i % 2 == 0 else []})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in preference_pairs(convs)) + "\n")
    recipe = {
        "task": "vlm_preference",
        "model": str(tiny_vlm("qwen2_vl", tmp_path / "vlm")),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "pairs.jsonl"), "val_split": 0, "max_length": 256},
        "train": {"max_steps": 3, "batch_size": 1, "logging_steps": 1},
    }
    ranks = train_two_ranks(write_recipe(recipe))
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"]
