"""Image decoding that never surprises: EXIF rotation applied, every PIL mode turned into 8-bit RGB, a pixel cap
against decompression bombs, and a cheap header/tail check used to validate a whole dataset before training."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Our own guard (below) replaces PIL's global one so the limit is per-recipe and the message is ours.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """Raised with a short reason; callers add the file or record name."""


def open_image(source: str | Path | bytes | Image.Image, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode `source` into an RGB image, raising `BadImage(reason)` for anything unusable."""
    try:
        img = source if isinstance(source, Image.Image) else Image.open(_as_file(source))
        _check_pixels(img, max_pixels)
        if draft_size and img.format == "JPEG":
            # Let libjpeg decode at a reduced scale: a large speed-up for big photos fed to a small network.
            img.draft("RGB", (draft_size, draft_size))
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImage(f"cannot be decoded ({err})") from None


def check_image(path: str | Path, max_pixels: int) -> None:
    """Fast validity check without a full decode: header, size cap, PNG CRCs (verify), JPEG end marker."""
    try:
        with Image.open(path) as img:
            _check_pixels(img, max_pixels)
            fmt = img.format
            img.verify()
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImage(f"is corrupt or not an image ({err})") from None
    if fmt == "JPEG" and not _jpeg_complete(Path(path)):
        raise BadImage("is a truncated JPEG (no end-of-image marker)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white; 16-bit and float are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi == lo and img.mode.startswith("I;16"):  # a flat 16-bit image keeps its level (white stays white)
            lo, hi = 0.0, 65535.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode == "La":  # premultiplied; PIL cannot convert La to RGBA directly
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"is {w}x{h} = {w * h:,} pixels, over the data.max_image_pixels cap of {max_pixels:,}")
    if w == 0 or h == 0:
        raise BadImage("has zero width or height")


def _as_file(source: str | Path | bytes):
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _jpeg_complete(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, io.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        return b"\xff\xd9" in f.read()
