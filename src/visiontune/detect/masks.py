"""Instance masks for the mask detector (`detector: maskrcnn`): COCO `segmentation` shapes (polygons, compressed or
uncompressed RLE, crowd RLE) checked when the set is read, rasterised by pycocotools as COCO's own tools do, and
predicted masks kept as compressed RLE (a float mask per detection per image would not fit in memory over a
validation set). Ours is only the glue: which frame a shape is in, EXIF turns, the checks' sentences.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from visiontune.detect.check import EDGE, TRANSPOSED

MASK_THRESHOLD = 0.5  # a predicted pixel belongs to the object at this probability (torchvision's COCO evaluation)


def segmentation_problem(segmentation: Any, width: int, height: int) -> str | None:
    """Why a COCO `segmentation` cannot be an object's mask on a width x height image (the frame the file draws it
    in), or None. Polygon points may overshoot the image by EDGE, as boxes may; an RLE must be of the image's size
    and decode (its counts fill exactly that size)."""
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, width, height)
    if not isinstance(segmentation, list) or not segmentation:
        return "has no `segmentation` (polygons or RLE), which detector maskrcnn needs for each object"
    tol_x, tol_y = max(1.0, EDGE * width), max(1.0, EDGE * height)
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            return "has a polygon that is not [x1, y1, x2, y2, x3, y3, ...] (at least 3 points)"
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in polygon):
            return "has a polygon with a coordinate that is not a number"
        for x, y in zip(polygon[0::2], polygon[1::2], strict=True):
            if not (-tol_x <= x <= width + tol_x and -tol_y <= y <= height + tol_y):
                return f"has a polygon point ({x:g}, {y:g}) outside the {width}x{height} image"
    return None


def _rle_problem(rle: dict, width: int, height: int) -> str | None:
    from pycocotools import mask as coco_mask

    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and "counts" in rle):
        return "has an RLE segmentation without `size` [height, width] and `counts`"
    if [size[0], size[1]] != [height, width]:
        return f"has an RLE of {size[1]}x{size[0]} (size is [height, width]) on a {width}x{height} image"
    try:
        coco_mask.decode(to_rle(rle, width, height))
    except (ValueError, TypeError, OverflowError):
        return "has an RLE whose `counts` do not fill its size (pycocotools cannot decode it)"
    return None


def to_rle(segmentation: Any, width: int, height: int) -> dict:
    """One compressed RLE of a COCO segmentation (polygons merged); segment/data.py has the same rule."""
    from visiontune.segment.data import coco_rle

    return coco_rle(segmentation, width, height)


def instance_masks(record: Any) -> np.ndarray:
    """uint8 [objects, height, width] of a BoxRecord read with masks, in the frame of the displayed image."""
    width, height = record.width, record.height
    stored = (height, width) if record.segment_turn in TRANSPOSED else (width, height)
    out = np.zeros((len(record.segments or []), height, width), dtype=np.uint8)
    for k, segmentation in enumerate(record.segments or []):
        out[k] = exif_turned(decode(segmentation, *stored), record.segment_turn)
    return out


def decode(segmentation: Any, width: int, height: int) -> np.ndarray:
    from pycocotools import mask as coco_mask

    return coco_mask.decode(to_rle(segmentation, width, height))


# How ImageOps.exif_transpose turns an image of each EXIF orientation: the masks turn with their pixels.
def exif_turned(mask: np.ndarray, orientation: int) -> np.ndarray:
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return mask if method is None else np.asarray(Image.fromarray(mask).transpose(method))


def encode(masks: Any) -> list[dict]:
    """Compressed RLEs (counts as text, JSON-ready) of bool/uint8 masks [N, H, W] (a tensor or an array)."""
    from pycocotools import mask as coco_mask

    if len(masks) == 0:
        return []
    array = np.asfortranarray(np.asarray(masks, dtype=np.uint8).reshape(-1, *np.shape(masks)[-2:]).transpose(1, 2, 0))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in coco_mask.encode(array)]


def decoded(rles: list[dict], height: int, width: int) -> np.ndarray:
    """bool [N, height, width] of `encode`'s RLEs."""
    from pycocotools import mask as coco_mask

    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    plain = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return coco_mask.decode(plain).transpose(2, 0, 1).astype(bool)
