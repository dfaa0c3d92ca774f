"""DeepSpeed and records without images. A VLM skips its vision tower on a batch without images, so when one rank's
batch has an image and another's has none, the ranks disagree about which parameters take part in the step:

* ZeRO-3: each rank holds a shard of every parameter and a module's forward gathers it from all ranks, so the rank
  with the image waits in the vision tower's gather while the other gathers the language model's layers: both wait
  forever (reproduced on two CPU ranks with a tiny Qwen2-VL; transformers, TRL and DeepSpeed leave it to the user).
* ZeRO-2: the ranks' gradient buckets differ (the vision tower's gradients exist on one rank only) and the first
  reduce fails with gloo's "collective mismatch" (reproduced the same way).

Running the vision path on a stand-in image for text-only batches (zero times its output added to the embeddings,
where an image batch runs it) got ZeRO-3 past the forward here but left the gradient reduce-scatters out of step. So
such data is refused under DeepSpeed, in one sentence before any rank trains, instead of hanging or crashing."""

from __future__ import annotations

from typing import Any


def mixed_images(records: list[Any]) -> bool:
    """Some records have images and some have none."""
    return len({bool(r.images) for r in records}) == 2


def refuse_text_only(train: Any, records: list[Any]) -> None:
    """Refuse `train.deepspeed` when some but not all records (conversations with `.images` and `.ref`) have no
    image, naming the first."""
    from visiontune.core.errors import DataError

    if not getattr(train, "deepspeed", None) or not mixed_images(records):
        return
    bare = [r for r in records if not r.images]
    if bare:
        raise DataError(
            f"{bare[0].ref} has no image, and under train.deepspeed a batch without images next to one with images "
            f"stops every rank ({len(bare)} of {len(records)} records have none); train without train.deepspeed, "
            "or give every record an image."
        )
