"""`builtin:mnist-segment`: real MNIST-5k digits pasted on cluttered canvases (core/canvases.py, the same canvases
as builtin:mnist-detect), with a per-pixel class from each digit's ink: 0 "background", 1 + d where digit d's ink is
(its scaled alpha at least canvases.INK). Training canvases use only builtin:mnist-5k-captions digits,
`builtin:mnist-segment-heldout` only builtin:mnist-5k-heldout digits. Seeded; written once as a mask folder
(images/NNNNN.png, masks/NNNNN.png of label ids, classes.txt) under $VISIONTUNE_CACHE/builtin/, in a folder named by
the generator version and the count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visiontune.core.canvases import CANVAS, cached_set, digit_pool, random_canvas, save_png

VERSION = 1  # bump when the canvases or masks change: the cache folder is keyed on it
COUNTS = {False: 2000, True: 300}
SEEDS = {False: 0, True: 1}
BACKGROUND = "background"


def class_names() -> list[str]:
    """background, then the digits: class 1 + d is digit d."""
    return [BACKGROUND, *(str(d) for d in range(10))]


def mnist_segment_dir(heldout: bool, count: int | None = None) -> Path:
    """The cached folder of the set (built on first use: ~9 s per 1,000 canvases on two busy cores)."""
    count = count or COUNTS[heldout]
    name = f"mnist-segment-v{VERSION}-{'heldout' if heldout else 'train'}-{count}"
    return cached_set(name, "classes.txt", lambda out: write_canvases(out, heldout, count, SEEDS[heldout]))


def write_canvases(out: Path, heldout: bool, count: int, seed: int) -> Path:
    """`count` canvases as out/images/NNNNN.png + out/masks/NNNNN.png (uint8 ids) + out/classes.txt (written last:
    its presence marks a complete set)."""
    digits, labels, _ = digit_pool(heldout)
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True)
    for k in range(count):
        canvas, _, masks, placed = random_canvas(rng, digits)
        save_png(canvas, out / "images" / f"{k:05d}.png")
        save_png(ink_mask(masks, [int(labels[i]) for i in placed]), out / "masks" / f"{k:05d}.png")
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in class_names()), encoding="utf-8")
    return out


def ink_mask(masks: list[np.ndarray], digits: list[int]) -> np.ndarray:
    """The class-id mask of one canvas: 1 + d on the ink of each pasted digit d (digits never overlap), 0 elsewhere."""
    out = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    for ink, digit in zip(masks, digits, strict=True):
        out[ink] = 1 + digit
    return out
