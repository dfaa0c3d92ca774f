"""Check a whole dataset once before training (headers, not full decodes) and apply `data.on_bad_sample`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from visiontune.core.errors import DataError
from visiontune.core.images import BadImage, check_image, open_image
from visiontune.core.readers import LabeledImages


@dataclass
class BadSample:
    index: int
    ref: str
    reason: str


def find_bad_samples(data: LabeledImages, max_pixels: int, workers: int = 4) -> list[BadSample]:
    """Every record that cannot be used, with the reason. In-memory arrays are always fine."""
    if data.kind == "array":
        return []

    def probe(i: int) -> BadSample | None:
        try:
            if data.kind == "file":
                check_image(data.items[i], max_pixels)
            else:
                open_image(_hf_image(data, i), max_pixels)
        except BadImage as err:
            return BadSample(i, data.ref(i), str(err))
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # I/O bound: threads overlap file reads
        return [b for b in pool.map(probe, range(len(data))) if b is not None]


def clean(data: LabeledImages, policy: str, max_pixels: int, role: str) -> tuple[LabeledImages, list[BadSample]]:
    """Return the usable subset; with policy `error`, stop on the first problem found (after checking all)."""
    if len(data) == 0:
        raise DataError(f"The {role} dataset {data.origin} is empty; point data.{role} at images.")
    bad = find_bad_samples(data, max_pixels)
    if bad and policy == "error":
        listed = "; ".join(f"{b.ref} {b.reason}" for b in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(
            f"{len(bad)} bad {role} sample(s) in {data.origin}: {listed}{more}. Fix or remove them, "
            "or set data.on_bad_sample=skip to train without them."
        )
    if not bad:
        return data, []
    bad_index = {b.index for b in bad}
    kept = data.subset([i for i in range(len(data)) if i not in bad_index])
    if len(kept) == 0:
        raise DataError(f"Every {role} sample in {data.origin} is bad (first: {bad[0].ref} {bad[0].reason}).")
    return kept, bad


def _hf_image(data: LabeledImages, i: int):
    value = data.hf_dataset[int(data.items[i])][data.image_column]
    if isinstance(value, dict):  # undecoded datasets.Image: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise BadImage("has no image")
    return value
