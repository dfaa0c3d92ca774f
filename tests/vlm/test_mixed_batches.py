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
