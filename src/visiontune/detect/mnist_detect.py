"""`builtin:mnist-detect`: real MNIST-5k digits pasted on cluttered canvases, with boxes and instance masks (COCO
RLE `segmentation`, for detector maskrcnn) from each digit's ink.

The canvases come from core/canvases.py (shared with builtin:mnist-segment): training canvases use only the 4,000
digits of builtin:mnist-5k-captions, `builtin:mnist-detect-heldout` only the 1,000 builtin:mnist-5k-heldout digits.
Generation is seeded, and written once (PNG images + a COCO annotations.json) under $VISIONTUNE_CACHE/builtin/, in a
folder named by the generator version and the count, so a changed generator never reuses an old set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from visiontune.core.canvases import CANVAS, cached_set, digit_pool, paste_digits, random_canvas, save_png
from visiontune.detect.masks import encode

# 2: a digit that found no room no longer shifts the labels of the digits after it onto the wrong boxes
# 3: each digit's ink mask as a COCO RLE `segmentation` (the canvases and boxes are those of version 2)
VERSION = 3  # bump when the canvases change: the cache folder is keyed on it
COUNTS = {False: 2000, True: 300}
SEEDS = {False: 0, True: 1}
_digits = digit_pool  # the digit pools, under the name the tests know


def mnist_detect_dir(heldout: bool, count: int | None = None) -> Path:
    """The cached folder of the set (built on first use: ~5 s per 1,000 canvases)."""
    count = count or COUNTS[heldout]
    name = f"mnist-detect-v{VERSION}-{'heldout' if heldout else 'train'}-{count}"
    return cached_set(name, "annotations.json", lambda out: write_canvases(out, heldout, count, SEEDS[heldout]))


def write_canvases(out: Path, heldout: bool, count: int, seed: int) -> Path:
    """`count` canvases as out/images/NNNNN.png + out/annotations.json (COCO; category ids = digits 0-9)."""
    digits, labels, names = digit_pool(heldout)
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True)
    images, annotations = [], []
    for k in range(count):
        canvas, boxes, masks, placed = random_canvas(rng, digits)
        name = f"images/{k:05d}.png"
        save_png(canvas, out / name)
        images.append({"id": k, "file_name": name, "width": CANVAS, "height": CANVAS})
        for (x0, y0, x1, y1), ink, i in zip(boxes, masks, placed, strict=True):
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": k,
                    "category_id": int(labels[i]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(ink.sum()),
                    "segmentation": encode(ink[None])[0],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": int(n), "name": n} for n in names]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (out / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
    return out


def render_canvas(
    rng: np.random.Generator, digits: list[np.ndarray], size: int = CANVAS
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[np.ndarray]]:
    """(canvas, ink boxes, ink masks) of core.canvases.paste_digits, without which digits found room."""
    return paste_digits(rng, digits, size)[:3]
