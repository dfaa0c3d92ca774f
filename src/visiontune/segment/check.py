"""Bad samples of a segmentation set, found while it is read (before training) with detection's machinery
(detect/check.py: `Problem`, `probe_images`-style header reads, `settle` for data.on_bad_sample, the report file).

Every image header is probed (exists, size, EXIF orientation) and every mask is decoded once: checking label ids
needs the pixels. Masks are small PNGs: reading builtin:mnist-segment (2,000 images + 128 px masks) takes ~1 s on
two busy cores, of which the image headers alone take 0.25 s; a 512 px label-id mask costs ~3 ms (its value
histogram is counted by PIL). The pixel counts per class come from the same pass. `find_bad_images`
(detect/check.py) is the full-decode image check for `core.check.check_splits`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from visiontune.core.check import Wording
from visiontune.core.errors import DataError
from visiontune.core.images import BadImage
from visiontune.detect.check import ImageInfo, Problem, find_bad_images, probe_image, settle
from visiontune.segment.data import BadMask, MaskDataset, MaskRecord, mask_counts, mask_size

__all__ = ["MASKS", "RawSample", "assemble", "find_bad_images"]

MASKS = Wording("sample", "segmentation set", "a mask folder (images/ + masks/), a VOC or COCO set or a `datasets` set")


@dataclass
class RawSample:
    image: str  # path, or DATASET[ROW]
    mask: str  # path, DATASET[ROW], or the key of the COCO shapes in MaskDataset.shapes
    row: int | None = None  # `datasets` row
    declared: tuple[int, int] | None = None  # COCO: the (width, height) the file states for the shapes
    image_ref: str = ""  # how messages name the image and the mask (default: `image`, `mask`)
    mask_ref: str = ""

    def __post_init__(self) -> None:
        self.image_ref, self.mask_ref = self.image_ref or self.image, self.mask_ref or self.mask


def assemble(
    raws: list[RawSample],
    problems: list[Problem],
    data: MaskDataset,
    on_bad_sample: str,
    max_pixels: int,
    image_source: Callable[[int], Any] | None = None,
) -> MaskDataset:
    """Probe every image and decode every mask (threads: PNG decoding releases the GIL), put the good samples into
    `data` (which holds the classes and the decoding), count pixels per class, apply data.on_bad_sample."""
    if not raws:
        raise DataError(f"{data.origin} lists no images; point the data key at a set with images and masks.")
    source = image_source or (lambda i: raws[i].image)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        checked = list(pool.map(lambda i: _check(i, raws[i], source, data, max_pixels), range(len(raws))))
    counts = np.zeros(0, dtype=np.int64)
    records: list[MaskRecord | None] = []
    for i, (record, problem, found) in enumerate(checked):
        if problem:
            problems.append(Problem(i, *problem))
        records.append(record)
        counts = _add(counts, found)
    counts = _add(counts, np.zeros(len(data.class_names), dtype=np.int64))
    dropped, skipped = settle(problems, on_bad_sample, data.origin, len(raws))
    kept = [r for i, r in enumerate(records) if r is not None and i not in dropped]
    return replace(data, records=kept, skipped=skipped, pixel_counts=counts.tolist())


def _check(
    i: int, raw: RawSample, source: Callable[[int], Any], data: MaskDataset, max_pixels: int
) -> tuple[MaskRecord | None, tuple[str, str] | None, np.ndarray]:
    """(record, None, pixels per class) for a good sample; (None, (file, reason), empty) for a bad one."""
    none = np.zeros(0, dtype=np.int64)
    try:
        info = probe_image(source(i), max_pixels)
    except BadImage as err:
        return None, (raw.image_ref, str(err)), none
    width, height = info.displayed
    record = MaskRecord(raw.image, raw.mask, width, height, raw.image_ref, raw.row)
    try:
        if data.encoding == "coco":  # the shapes' frame is the size the file states (else the displayed image)
            stated = raw.declared or info.displayed
            if stated not in (info.displayed, info.stored):
                raise BadMask(f"state the image is {stated[0]}x{stated[1]} but it is {width}x{height}")
        else:
            stated = mask_size(data, record)
        record = replace(record, orientation=_orientation(stated, info))
        return record, None, mask_counts(data, record)
    except BadMask as err:
        return None, (raw.mask_ref, str(err)), none


def _orientation(size: tuple[int, int], info: ImageInfo) -> int:
    """1 when the mask is drawn on the image as displayed; the image's EXIF orientation when it matches only the
    stored pixels (its annotator ignored the tag), so it turns with them. Any other size is left to finish_mask's
    size check (1)."""
    if tuple(size) == info.displayed or tuple(size) != info.stored:
        return 1
    return info.orientation


def _add(total: np.ndarray, found: np.ndarray) -> np.ndarray:
    if len(found) > len(total):
        total = np.pad(total, (0, len(found) - len(total)))
    total[: len(found)] += found
    return total
