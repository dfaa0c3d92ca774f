"""Bad annotations, found while a detection set is read (before training): each problem is one `Problem` naming the
file and the annotation; `settle` applies data.on_bad_sample to them. Images are probed, not decoded: the header
gives the size and the EXIF orientation. `find_bad_images` is the full-decode check, for `core.check.check_splits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from visiontune.core.check import LISTED, BadSample, Wording, write_report
from visiontune.core.errors import DataError
from visiontune.core.images import BadImage, _as_file, _check_pixels, check_image, hf_image_value, open_image

ANNOTATIONS = Wording("annotation", "detection set", "a COCO .json, a YOLO data.yaml or a VOC folder")
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageInfo:
    """An image's header: its stored size and EXIF orientation (1 = as stored)."""

    stored: tuple[int, int]
    orientation: int = 1

    @property
    def displayed(self) -> tuple[int, int]:
        w, h = self.stored
        return (h, w) if self.orientation in TRANSPOSED else (w, h)


@dataclass(frozen=True)
class Problem:
    image: int  # index of the image it concerns among those read; -1: none (a label file without an image)
    ref: str  # file + annotation: "ann.json annotation 17 (image a.jpg)"
    reason: str


def probe_image(source: str | Path | bytes, max_pixels: int) -> ImageInfo:
    """Size and EXIF orientation from the header only (PIL opens lazily); BadImage(reason) if unusable."""
    with opened(source) as img:
        _check_pixels(img, max_pixels)
        orientation = _orientation(img)
        return ImageInfo(img.size, orientation if orientation in range(1, 9) else 1)


@contextmanager
def opened(source: str | Path | bytes, bad: type[Exception] = BadImage) -> Iterator[Image.Image]:
    """PIL's lazily opened image of `source`; whatever goes wrong while it is open (a missing file, a file PIL
    cannot read, its pixels failing to decode) becomes `bad(reason)`, and a `bad` raised inside passes through.
    Shared with segmentation's mask decoding (bad=BadMask)."""
    try:
        with Image.open(_as_file(source)) as img:
            yield img
    except bad:
        raise
    except FileNotFoundError:
        raise bad("is missing (file not found)") from None
    except Exception as err:  # PIL raises several types on a file that is not an image
        raise bad(f"is not an image PIL can open ({type(err).__name__})") from None


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation ImageOps.exif_transpose will apply. A PNG with no eXIf chunk before its pixel data is
    taken as upright: PIL would decode the whole image looking for one after it (writers put it before)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return img.getexif().get(0x0112, 1)


def probe_images(
    n: int, source: Callable[[int], str | Path | bytes], max_pixels: int, workers: int = 8
) -> list[ImageInfo | str]:
    """`probe_image` of `source(i)` for i < n, several at once (header reads wait on I/O); a failure becomes its
    reason."""

    def one(i: int) -> ImageInfo | str:
        try:
            return probe_image(source(i), max_pixels)
        except BadImage as err:
            return str(err)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, range(n)))


EDGE = 0.01  # a box may overshoot the image by 1 % of its side (at least 1 px) and is clipped; more is an error


def check_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[tuple, str | None]:
    """The box clipped to the image, or a reason it is bad (outside the image, zero area, not finite)."""
    x0, y0, x1, y1 = box
    shown = "[" + ", ".join(f"{v:g}" for v in box) + "]"
    if not all(abs(v) < float("inf") for v in box):
        return box, f"has a box {shown} (xyxy) with a coordinate that is not a number"
    if x1 <= x0 or y1 <= y0:
        return box, f"has a box {shown} (xyxy) of zero area"
    tol_x, tol_y = max(1.0, EDGE * width), max(1.0, EDGE * height)
    if x0 < -tol_x or y0 < -tol_y or x1 > width + tol_x or y1 > height + tol_y:
        return box, f"has a box {shown} (xyxy) outside the {width}x{height} image"
    clipped = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        return box, f"has a box {shown} (xyxy) outside the {width}x{height} image"
    return clipped, None


def settle(problems: list[Problem], on_bad_sample: str, origin: str, n_images: int) -> tuple[set[int], list]:
    """Apply data.on_bad_sample: `error` raises one sentence naming the first problems (all of them go to a report
    file); `skip` returns the images to leave out and the problems as `BadSample`s. A bad annotation drops its whole
    image: kept without the box, the object would be trained as background."""
    if not problems:
        return set(), []
    entries = [f"{p.ref} {p.reason}" for p in problems]
    if on_bad_sample == "error":
        more = f"; ... and {len(entries) - LISTED} more" if len(entries) > LISTED else ""
        listed = "; ".join(entries[:LISTED]) + more
        report = write_report(entries, "bad-annotations")
        where = f" (the full list is in {report})" if report else ""
        raise DataError(
            f"{len(problems)} bad annotation(s) in {origin}: {listed}{where}; fix or remove them, or set "
            "data.on_bad_sample=skip to leave their images out."
        )
    dropped = {p.image for p in problems if p.image >= 0}
    if n_images and len(dropped) >= n_images:
        raise DataError(f"Every image in {origin} has a bad annotation (first: {entries[0]}); fix the annotations.")
    return dropped, [BadSample(p.image, p.ref, p.reason) for p in problems]


def find_bad_images(data, max_pixels: int, workers: int = 4) -> list[BadSample]:
    """Every image of a BoxDataset that does not decode as training will decode it (truncated files): for
    `core.check.check_splits(splits, lambda d: find_bad_images(d, cap), on_bad_sample, ANNOTATIONS)`."""

    def probe(i: int) -> BadSample | None:
        record = data.records[i]
        try:
            if record.row is None:
                check_image(record.image, max_pixels)
            else:
                open_image(hf_image_value(data.hf_dataset, record.row, data.image_column), max_pixels)
        except BadImage as err:
            return BadSample(i, record.image, str(err))
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [b for b in pool.map(probe, range(len(data))) if b is not None]
