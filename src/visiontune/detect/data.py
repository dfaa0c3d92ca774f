"""Box-labelled image sets: `BoxRecord` / `BoxDataset`, `read_boxes` (dispatch on what a path is) and `split_boxes`.

Coordinates are xyxy in absolute pixels of the image *as displayed*, i.e. after its EXIF orientation is applied:
the pixels are decoded with `ImageOps.exif_transpose` (core/images.py), so the boxes must live in that frame too.
Formats: COCO JSON, YOLO (`data.yaml`), Pascal VOC (Annotations/ + JPEGImages/), a `datasets` dataset with an
`objects` column, and `builtin:mnist-detect[-heldout]`; see detect/readers.py for each format's rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.core.check import BadSample
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.core.errors import DataError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class BoxRecord:
    image: str  # image path, or a stable ref like "DATASET[12]" for an in-memory (`datasets`) set; see `row`
    boxes: list[Box]  # xyxy, absolute pixels of the image as displayed (after EXIF transpose)
    labels: list[int]  # contiguous class indices 0..C-1 into BoxDataset.class_names
    iscrowd: list[bool]  # COCO crowd regions / VOC difficult: ignored by mAP matching, never trained as objects
    width: int  # of the image as displayed
    height: int
    source: str  # where it came from, for messages: "ann.json image 17", "labels/x.txt"
    row: int | None = None  # the row of BoxDataset.hf_dataset holding the image, for a `datasets` set
    # Instance masks (read only for a mask detector): each object's COCO segmentation (polygons or RLE), in step with
    # `boxes`, drawn on the image as stored and turned with its pixels by EXIF orientation `segment_turn` (1: as is).
    segments: list[Any] | None = None
    segment_turn: int = 1


@dataclass
class BoxDataset:
    records: list[BoxRecord]  # an image with no boxes is a valid negative
    class_names: list[str]
    category_ids: list[int]  # original category id of each class (COCO ids need not be contiguous; YOLO/VOC: 0..C-1)
    skipped: list[BadSample] = field(default_factory=list)  # what data.on_bad_sample=skip left out, with reasons
    origin: str = ""  # the path or builtin name, for messages
    hf_dataset: Any = None  # a `datasets` set whose `image_column` holds the images of records with a `row`
    image_column: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int]) -> BoxDataset:
        """The records at `indices` (the classes, origin and image source kept; `skipped` is not carried over)."""
        return BoxDataset(
            [self.records[i] for i in indices],
            self.class_names,
            self.category_ids,
            origin=self.origin,
            hf_dataset=self.hf_dataset,
            image_column=self.image_column,
        )

    def ref(self, i: int) -> str:
        return self.records[i].image

    @property
    def has_masks(self) -> bool:
        """Whether the set was read with instance masks (`read_boxes(..., masks=True)`)."""
        return any(r.segments is not None for r in self.records)


def read_boxes(
    path: str,
    split: str = "train",
    class_names: list[str] | None = None,
    on_bad_sample: str = "error",
    image_root: str | None = None,
    max_image_pixels: int = PIL_MAX_PIXELS,
    masks: bool = False,
) -> BoxDataset:
    """Read a box-labelled set, checking every annotation (and every image's header: it exists, its size and EXIF
    orientation) without decoding pixels. `class_names` fixes the classes and their order (e.g. the training set's
    when reading a val set); a category outside it is a bad annotation. Bad annotations raise one DataError naming
    them, or with `on_bad_sample="skip"` drop their images and are listed in `skipped`. `image_root`: where COCO
    file names are relative to (default: the JSON's folder). `split` picks the YOLO/VOC/`datasets` split.
    `masks`: also read each object's mask (a mask detector): COCO `segmentation`, YOLO polygon lines (segmentation
    labels), a `datasets` `objects.segmentation`; VOC holds boxes only."""
    from visiontune.detect import readers

    if path.startswith("builtin:"):
        return readers.read_builtin(path, class_names, on_bad_sample, max_image_pixels, masks)
    where = Path(path).expanduser()
    if where.is_file() and where.suffix.lower() == ".json":
        return readers.read_coco(where, class_names, on_bad_sample, image_root, max_image_pixels, masks)
    if where.is_file() and where.suffix.lower() in (".yaml", ".yml"):
        return readers.read_yolo(where, split, class_names, on_bad_sample, max_image_pixels, masks)
    if where.is_dir():
        if (where / "data.yaml").is_file():
            return readers.read_yolo(where / "data.yaml", split, class_names, on_bad_sample, max_image_pixels, masks)
        if (where / "Annotations").is_dir():
            if masks:
                raise DataError(
                    f"{path} is a Pascal VOC detection set (boxes only), but detector maskrcnn learns each object's "
                    "mask; give COCO `segmentation`, YOLO polygon labels or a `datasets` `objects.segmentation`."
                )
            return readers.read_voc(where, split, class_names, on_bad_sample, max_image_pixels)
        if (where / "dataset_info.json").is_file() or (where / "dataset_dict.json").is_file():
            return readers.read_hf(where, split, class_names, on_bad_sample, max_image_pixels, masks)
    if hub_id_or_missing(path, "Detection"):  # a hub id, cached offline
        return readers.read_hf(path, split, class_names, on_bad_sample, max_image_pixels, masks)
    raise DataError(
        f"{path} is not a detection set visiontune reads; use a COCO .json file, a YOLO data.yaml (or its folder), "
        "a Pascal VOC folder (Annotations/ + JPEGImages/), a `datasets` dataset with an `objects` column, or "
        "builtin:mnist-detect."
    )


def hub_id_or_missing(path: str, kind: str) -> bool:
    """For a data path no known format claimed: True when it is a `datasets` hub id (read from the offline cache),
    a DataError when nothing is there, False for an existing path of no known format (the caller says which)."""
    if Path(path).expanduser().exists():
        return False
    if "/" in path and not path.startswith((".", "/", "~")):
        return True
    raise DataError(f"{kind} data {path} does not exist; check data.train / data.val in the recipe.")


def split_boxes(data: BoxDataset, fraction: float, seed: int) -> tuple[BoxDataset, BoxDataset]:
    """Seeded split by image into (train, val), each keeping the original record order."""
    import numpy as np

    n_val = int(round(fraction * len(data)))
    if n_val < 1 or n_val >= len(data):
        raise DataError(f"data.val_split={fraction} leaves no train or no val images from {len(data)}; change it.")
    order = np.random.default_rng(seed).permutation(len(data))
    val = sorted(order[:n_val].tolist())
    chosen = set(val)
    return data.subset([i for i in range(len(data)) if i not in chosen]), data.subset(val)
