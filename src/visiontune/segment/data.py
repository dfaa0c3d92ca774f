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
from visiontune.detect.data import hub_id_or_missing

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
    if hub_id_or_missing(path, "Segmentation"):
        return readers.read_hf(path, split, options)  # a hub id, cached offline
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
    Raises `BadMask(reason)` for a mask that cannot be used (read_masks has checked every one already)."""
    return finish_mask(data, record, mask_values(data, record))


class BadMask(Exception):
    """Raised with a short reason; callers add the mask's name."""


# EXIF orientation -> the PIL transpose that ImageOps.exif_transpose applies for it
TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270"}
TRANSPOSE |= {7: "TRANSVERSE", 8: "ROTATE_90"}


def mask_values(data: MaskDataset, record: MaskRecord) -> np.ndarray:
    """The mask as stored, before it is turned and checked: class ids for COCO shapes, the file's values (label ids)
    or packed 0xRRGGBB colours (palette encoding) otherwise."""
    if data.encoding == "coco":
        turned = record.orientation in (5, 6, 7, 8)
        width, height = (record.height, record.width) if turned else (record.width, record.height)
        return render_shapes(data.shapes.get(record.mask, []), data.fill, width, height)
    from visiontune.detect.check import opened

    with opened(_mask_source(data, record), BadMask) as img:
        _refuse_jpeg(img)
        return _palette_values(img) if data.encoding == "palette" else _id_values(img)


def _refuse_jpeg(img: Any) -> None:
    if img.format == "JPEG":
        raise BadMask("is a JPEG: its lossy compression changes the values along every edge; save masks as PNG")


def finish_mask(data: MaskDataset, record: MaskRecord, values: np.ndarray) -> np.ndarray:
    """Turn the stored values into the displayed frame, check the size, map them to class ids."""
    if record.orientation != 1:
        from PIL import Image

        method = getattr(Image.Transpose, TRANSPOSE[record.orientation])
        values = np.asarray(Image.fromarray(values.astype(np.int32)).transpose(method), dtype=np.int64)
    if values.shape != (record.height, record.width):
        h, w = values.shape
        raise BadMask(f"is {w}x{h} but its image is {record.width}x{record.height}")
    if data.encoding == "coco":
        return values.astype(np.int64, copy=False)
    if data.encoding == "palette":
        return _map_colours(values, data.palette or {})
    return _map_ids(values, data.lut, data.ignore_index)


def _mask_source(data: MaskDataset, record: MaskRecord) -> Any:
    if record.row is None:
        return record.mask
    from visiontune.core.images import BadImage, hf_image_value

    try:
        return hf_image_value(data.hf_dataset, record.row, data.mask_column, missing="has no annotation image")
    except BadImage as err:
        raise BadMask(str(err)) from None


def _id_values(img: Any) -> np.ndarray:
    """Label ids as stored: a P-mode PNG's palette indices (VOC), L / I;16 / I values; an RGB mask is accepted only
    when it is grey (ids saved as RGB), since its colours would otherwise be read as ids."""
    if img.mode in ("P", "L", "I", "1") or img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.int64)
    if img.mode in ("LA", "PA"):
        return np.asarray(img.getchannel(0)).astype(np.int64)
    rgb = np.asarray(img.convert("RGB"))
    if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 0] != rgb[..., 2]).any():
        raise BadMask("is a colour (RGB) mask; give its colours as data.palette, or save label ids (mode L or P)")
    return rgb[..., 0].astype(np.int64)


def _palette_values(img: Any) -> np.ndarray:
    rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _map_ids(values: np.ndarray, lut: np.ndarray | None, ignore_index: int) -> np.ndarray:
    if lut is None:
        lut = np.arange(256, dtype=np.int64)
    if int(values.min()) >= 0 and int(values.max()) < len(lut):
        out = lut[values]
        if out.min() >= 0:
            return out
    raise _no_class(np.unique(values), lut, ignore_index)


def _no_class(found: np.ndarray, lut: np.ndarray, ignore_index: int) -> BadMask:
    """The error for the values among `found` that name no class."""
    bad = [int(v) for v in found if not 0 <= v < len(lut) or lut[v] < 0]
    known = [int(v) for v in np.flatnonzero(lut >= 0) if lut[v] != ignore_index]
    span = f"{known[0]}-{known[-1]}" if known else "none"
    return BadMask(f"has label id(s) {_first(bad)} with no class (ids with a class: {span}; ignore: {ignore_index})")


def mask_size(data: MaskDataset, record: MaskRecord) -> tuple[int, int]:
    """The stored (width, height) of the record's mask file, from its header."""
    from visiontune.detect.check import opened

    with opened(_mask_source(data, record), BadMask) as img:
        return img.size


def mask_counts(data: MaskDataset, record: MaskRecord) -> np.ndarray:
    """Pixels per class id of the record's mask (ignore not counted), making every check decode_mask makes. Label-id
    masks are checked from their value histogram (counted by PIL in C) instead of being mapped pixel by pixel: a
    512 px mask costs ~4x less."""
    if data.encoding != "ids" or data.lut is None:
        ids = decode_mask(data, record)
        return np.bincount(ids[ids != data.ignore_index].ravel())
    from visiontune.detect.check import opened

    with opened(_mask_source(data, record), BadMask) as img:
        _refuse_jpeg(img)
        width, height = img.size[::-1] if record.orientation in (5, 6, 7, 8) else img.size
        if (width, height) != (record.width, record.height):
            raise BadMask(f"is {width}x{height} but its image is {record.width}x{record.height}")
        hist = np.asarray(img.histogram() if img.mode in ("L", "P") else np.bincount(_id_values(img).ravel()))
    found = np.flatnonzero(hist)
    if found[-1] >= len(data.lut) or (data.lut[found] < 0).any():
        raise _no_class(found, data.lut, data.ignore_index)
    ids = data.lut[found]
    keep = ids != data.ignore_index
    return np.bincount(ids[keep], weights=hist[found][keep]).astype(np.int64)


def _map_colours(packed: np.ndarray, palette: dict[int, int]) -> np.ndarray:
    colours, inverse = np.unique(packed, return_inverse=True)
    ids = np.array([palette.get(int(c), -1) for c in colours], dtype=np.int64)
    if (ids < 0).any():
        bad = [f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in colours[ids < 0].tolist()]
        raise BadMask(f"has the colour(s) {_first(bad)}, not in data.palette")
    return ids[inverse].reshape(packed.shape)


def _first(values: list, n: int = 5) -> str:
    return ", ".join(str(v) for v in values[:n]) + (f" and {len(values) - n} more" if len(values) > n else "")


def render_shapes(shapes: list[Shape], fill: int, width: int, height: int) -> np.ndarray:
    """COCO polygons / RLE painted in order (the reader puts crowd regions first, then objects largest first) onto
    a `fill` canvas, rasterised by pycocotools as COCO's own tools do."""
    from pycocotools import mask as coco_mask

    out = np.full((height, width), fill, dtype=np.int64)
    for shape in shapes:
        size = shape.segmentation.get("size") if isinstance(shape.segmentation, dict) else [height, width]
        if list(size) != [height, width]:
            raise BadMask(f"has an RLE of {size[1]}x{size[0]} on a {width}x{height} image")
        try:
            region = coco_mask.decode(coco_rle(shape.segmentation, width, height)).astype(bool)
        except (ValueError, TypeError) as err:  # counts that do not add up to the stated size
            raise BadMask(f"has an RLE pycocotools cannot decode ({err})") from None
        out[region] = shape.label
    return out


def coco_rle(segmentation: Any, width: int, height: int) -> dict:
    """One compressed RLE of a COCO segmentation: polygons (merged), uncompressed or compressed RLE."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        return coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return coco_mask.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
