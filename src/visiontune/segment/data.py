"""Mask-labelled image sets: `MaskRecord` / `MaskDataset`, `read_masks` (dispatch on what a path is), `split_masks`
and `decode_mask` (a record's mask as a [H, W] int64 array of class ids, `ignore_index` where no class counts).

Masks are in the frame of the image *as displayed* (after its EXIF orientation, as core/images.py decodes pixels);
a mask the size of the stored image of a turned photo is turned with it (see `MaskRecord.orientation`).
Formats and their rules are in segment/readers.py: mask PNG folders (label ids, or an RGB palette), Pascal VOC
(SegmentationClass), COCO polygons / RLE, a `datasets` dataset with an image and an annotation-image column, and
`builtin:mnist-segment[-heldout]`. Every mask is decoded once while reading, so a label id with no class, a colour
outside the palette or a size that differs from its image is found before training, never inside a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from visiontune.core.check import BadSample
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.core.errors import DataError

Encoding = Literal["ids", "palette", "coco"]
IGNORE_NAME = "ignore"  # a palette entry of this name marks pixels left out of the loss and the metrics


@dataclass(frozen=True)
class MaskRecord:
    image: str  # image path, or a stable ref like "DATASET[12]" for a `datasets` set (see `row`)
    mask: str  # mask path, "DATASET[12]" (the row's annotation image), or "ann.json#ID" (COCO shapes in `shapes`)
    width: int  # of the image as displayed
    height: int
    source: str  # where it came from, for messages
    row: int | None = None  # the row of MaskDataset.hf_dataset holding the image and the mask
    orientation: int = 1  # EXIF orientation to apply to the mask: its annotator drew on the stored (unturned) pixels


@dataclass(frozen=True)
class Shape:
    """One COCO annotation, rendered into the mask when it is decoded."""

    label: int  # class index, or the ignore index for a crowd region
    segmentation: Any  # polygons [[x, y, ...], ...], or RLE {"size": [h, w], "counts": ...}
    area: float  # painted largest first, so a small object on a large one stays visible


@dataclass
class MaskDataset:
    records: list[MaskRecord]
    class_names: list[str]  # index = class id the model predicts
    ignore_index: int = 255  # in decoded masks: pixels that count in neither loss nor metrics
    encoding: Encoding = "ids"  # ids: the mask's values through `lut`; palette: RGB colours; coco: `shapes`
    lut: np.ndarray | None = None  # ids: file value -> class id (ignore_index kept, -1 = no class)
    palette: dict[int, int] | None = None  # palette: packed 0xRRGGBB -> class id (or ignore_index)
    shapes: dict[str, list[Shape]] = field(default_factory=dict)  # coco: record.mask -> its shapes
    fill: int = 0  # coco: the value of pixels no shape covers ("background"'s id, or ignore_index)
    skipped: list[BadSample] = field(default_factory=list)  # what data.on_bad_sample=skip left out, with reasons
    origin: str = ""  # the path or builtin name, for messages
    hf_dataset: Any = None  # a `datasets` set holding the images (image_column) and masks (mask_column) of rows
    image_column: str | None = None
    mask_column: str | None = None
    pixel_counts: list[int] = field(default_factory=list)  # pixels of each class over the records read

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int]) -> MaskDataset:
        """The records at `indices`, with everything needed to decode them (`skipped`, `pixel_counts` not carried)."""
        from dataclasses import replace

        return replace(self, records=[self.records[i] for i in indices], skipped=[], pixel_counts=[])

    def ref(self, i: int) -> str:
        return self.records[i].image


def read_masks(
    path: str,
    split: str = "train",
    class_names: list[str] | None = None,
    palette: dict[str, Sequence[int]] | None = None,
    ignore_index: int = 255,
    on_bad_sample: str = "error",
    image_root: str | None = None,
    max_image_pixels: int = PIL_MAX_PIXELS,
    reduce_labels: bool = False,
) -> MaskDataset:
    """Read a mask-labelled set and check it whole: every image header (exists, size, EXIF orientation) and every
    mask decoded (exists, same size as its image, only known label ids / palette colours). Bad samples raise one
    DataError naming the first few, or with `on_bad_sample="skip"` are left out and listed in `skipped`.

    `class_names` fixes the classes and their order (a val set gets the training set's); `palette` ({name: [r, g,
    b]}) says the masks are RGB colours (a name `ignore` marks the ignore colour); `reduce_labels` (transformers'
    `do_reduce_labels`, for ADE20K / scene_parse_150) reads id 0 as ignore and id k as class k - 1. `split` picks the
    VOC / `datasets` / split-folder split; `image_root` is where COCO file names are relative to."""
    from visiontune.segment import readers

    options = readers.Options(class_names, palette, ignore_index, on_bad_sample, max_image_pixels, reduce_labels)
    if path.startswith("builtin:"):
        return readers.read_builtin(path, options)
    where = Path(path).expanduser()
    if where.is_file() and where.suffix.lower() == ".json":
        return readers.read_coco(where, image_root, options)
    if where.is_dir():
        if (where / "SegmentationClass").is_dir():
            return readers.read_voc(where, split, options)
        if (where / "dataset_info.json").is_file() or (where / "dataset_dict.json").is_file():
            return readers.read_hf(where, split, options)
        if readers.mask_folders(where, split) is not None:
            return readers.read_folder(where, split, options)
    if not where.exists() and "/" in path and not path.startswith((".", "/", "~")):
        return readers.read_hf(path, split, options)  # a hub id, cached offline
    if not where.exists():
        raise DataError(f"Segmentation data {path} does not exist; check data.train / data.val in the recipe.")
    raise DataError(
        f"{path} is not a segmentation set visiontune reads; use a folder with images/ and masks/ (same names), a "
        "Pascal VOC folder (JPEGImages/ + SegmentationClass/), a COCO .json with polygons or RLE, a `datasets` "
        "dataset with an image and an annotation column, or builtin:mnist-segment."
    )


def split_masks(data: MaskDataset, fraction: float, seed: int) -> tuple[MaskDataset, MaskDataset]:
    """Seeded split by image into (train, val), each keeping the original record order (detection's rule)."""
    from visiontune.detect.data import split_boxes

    return split_boxes(data, fraction, seed)  # type: ignore[arg-type]  # it needs only len() and subset()


def decode_mask(data: MaskDataset, record: MaskRecord) -> np.ndarray:
    """The record's mask in the displayed frame: [H, W] int64 class ids, `data.ignore_index` where none counts.
    Raises `readers.BadMask(reason)` for a mask that cannot be used (the reader has checked every one already)."""
    from visiontune.segment import readers

    return readers.decode(data, record)
