"""Format readers behind segment/data.py:read_masks (work in progress: decode is final, the readers follow)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiontune.segment.data import MaskDataset, MaskRecord


class BadMask(Exception):
    """Raised with a short reason; callers add the mask's name."""


@dataclass(frozen=True)
class Options:
    """read_masks' settings, passed to every format reader."""

    class_names: list[str] | None = None
    palette: dict[str, Sequence[int]] | None = None
    ignore_index: int = 255
    on_bad_sample: str = "error"
    max_pixels: int = 0
    reduce_labels: bool = False


def mask_folders(root: Path, split: str) -> tuple[Path, Path] | None:
    raise NotImplementedError


def read_folder(root: Path, split: str, options: Options) -> MaskDataset:
    raise NotImplementedError


def read_voc(root: Path, split: str, options: Options) -> MaskDataset:
    raise NotImplementedError


def read_coco(path: Path, image_root: str | None, options: Options) -> MaskDataset:
    raise NotImplementedError


def read_hf(path: str | Path, split: str, options: Options) -> MaskDataset:
    raise NotImplementedError


def read_builtin(spec: str, options: Options) -> MaskDataset:
    raise NotImplementedError


def decode(data: MaskDataset, record: MaskRecord) -> np.ndarray:
    raise NotImplementedError
