"""Image decoding that never surprises: EXIF rotation applied, every PIL mode turned into 8-bit RGB, a pixel cap
against decompression bombs, and the full-decode check used to validate a whole dataset before training."""

from __future__ import annotations

import io
import os
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Our own guard (below) replaces PIL's global one so the limit is per-recipe and the message is ours.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
_BUFFER = re.compile(r" <_io\.BytesIO object at 0x[0-9a-f]+>")


def _readable_extensions() -> frozenset[str]:
    """The extensions of every format this Pillow opens (its registered plugins, so .jfif is read as the JPEG it is
    and .avif wherever Pillow has AVIF support), not a list of our own that silently drops the rest. Save-only
    formats (PDF, Palm) are left out; MPO files are opened by the JPEG plugin."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN or fmt == "MPO")


IMAGE_EXTENSIONS = _readable_extensions()


class BadImage(Exception):
    """Raised with a short reason; callers add the file or record name."""


def open_image(source: str | Path | bytes | Image.Image, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode `source` fully into an RGB image, raising `BadImage(reason)` for anything unusable."""
    return _decode(source, max_pixels, draft_size, "cannot be decoded")


def check_image(path: str | Path, max_pixels: int) -> None:
    """Decode the file exactly as training does (full pixel data, EXIF rotation, RGB conversion), so a file that
    passes cannot fail mid-training: a header check misses truncated GIF/BMP/TIFF/PPM files. JPEGs decode at 1/8
    scale, which is ~3x faster and still reads (and so checks) every byte of the compressed data."""
    _decode(path, max_pixels, 1, "is corrupt or not an image")


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


def _decode(
    source: str | Path | bytes | Image.Image, max_pixels: int, draft_size: int | None, failure: str
) -> Image.Image:
    try:
        # Close what we opened: a multi-frame GIF/TIFF keeps its file open after load(), and a check opens thousands.
        with nullcontext(source) if isinstance(source, Image.Image) else Image.open(_as_file(source)) as img:
            _check_pixels(img, max_pixels)
            if draft_size and img.format == "JPEG":
                # Let libjpeg decode at a reduced scale: a large speed-up for big photos fed to a small network.
                img.draft("RGB", (draft_size, draft_size))
            rgb = to_rgb(ImageOps.exif_transpose(img))  # a new image (exif_transpose copies), so closing img is safe
            rgb.load()  # decode now: a truncated file must fail here, named, not later inside a transform
            return rgb
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Exception as err:  # PIL plugins raise OSError, EOFError, struct.error, IndexError... on malformed files
        raise BadImage(f"{failure} ({_detail(err, source)})") from None


def _detail(err: Exception, source: object) -> str:
    """PIL's message without the file name or buffer it repeats: the caller names the record already."""
    named = f" {os.fspath(source)!r}" if isinstance(source, str | Path) else ""
    return _BUFFER.sub("", str(err).replace(named, "") if named else str(err)) or type(err).__name__


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"is {w}x{h} = {w * h:,} pixels, over the data.max_image_pixels cap of {max_pixels:,}")
    if w == 0 or h == 0:
        raise BadImage("has zero width or height")


def _as_file(source: str | Path | bytes):
    return io.BytesIO(source) if isinstance(source, bytes) else source


def hf_image_value(dataset, row: int, column: str, missing: str = "has no image"):
    """The image of a `datasets` row: a decoded PIL image, or bytes/path of an undecoded `datasets.Image`."""
    value = dataset[row][column]
    if isinstance(value, dict):  # undecoded datasets.Image: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise BadImage(missing)
    return value
