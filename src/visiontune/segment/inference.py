"""Masks for images of any size, and their evaluation against the masks as labelled (each image's own resolution).

Two ways to run a model trained on image_size x image_size squares over an image (`eval.mode`): `resize` (the whole
image squeezed to the square, as transformers' image processors do; the logits resized back) and `slide` (windows of
the square over the image at its own resolution, overlapping logits averaged: mmseg's slide inference), which keeps
the detail of an image much larger than the training square. Scores count every labelled pixel at the labels' own
resolution, so they do not depend on the training size; ignored pixels count nowhere.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from visiontune.segment.data import MaskDataset
from visiontune.segment.dataset import SegmentationDataset, segmentation_collate
from visiontune.segment.metrics import pixel_confusion, segmentation_scores
from visiontune.segment.model import Segmenter, resized
from visiontune.segment.universal import scores_as_logits

SAMPLES = 4  # validation images whose predicted masks are kept for the report's pictures
WINDOWS_PER_BATCH = 16


class IndexedImages(torch.utils.data.Dataset):
    """Evaluation items at their own size: (image float [3, H, W] 0..1, mask [H, W], index in the set)."""

    def __init__(self, data: MaskDataset, max_image_pixels: int):
        self.items = SegmentationDataset(data, None, max_image_pixels)

    @property
    def data(self) -> MaskDataset:
        return self.items.data

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = self.items[i]
        return image, mask, i


class SegmentationCollator:
    """Training items stack into {"pixel_values", "labels"} (one size after the transforms); evaluation items
    (`IndexedImages`, each its own size) stay lists: {"images", "masks", "index"}."""

    def __call__(self, batch: list[tuple]) -> dict[str, Any]:
        if len(batch[0]) == 2:
            return segmentation_collate(batch)
        images, masks, index = zip(*batch, strict=True)
        return {
            "images": [image.as_subclass(torch.Tensor) for image in images],
            "masks": [mask.as_subclass(torch.Tensor).long() for mask in masks],
            "index": torch.tensor(index),
        }


# ------------------------------------------------------------------------------------------------ logits


def image_logits(model: Segmenter, images: Sequence[torch.Tensor], mode: str, stride: float) -> list[torch.Tensor]:
    """Class logits [C, H, W] of each image (float [3, H, W] 0..1) at its own size."""
    if mode == "slide":
        return [window_logits(model, image, stride) for image in images]
    side = model.image_size
    squares = torch.stack([_resize(image, (side, side)) for image in images])
    raw = model.raw_logits(squares)
    return [resized(raw[i : i + 1], tuple(image.shape[-2:]))[0] for i, image in enumerate(images)]


def window_logits(model: Segmenter, image: torch.Tensor, stride: float) -> torch.Tensor:
    """Logits of windows of image_size sliding over the image by `stride` of a window, averaged where they
    overlap; an image smaller than a window is padded (black) for it and cropped back."""
    side, (height, width) = model.image_size, image.shape[-2:]
    padded = F.pad(image, (0, max(side - width, 0), 0, max(side - height, 0)))
    step = max(1, int(side * stride))
    corners = [(y, x) for y in _starts(padded.shape[-2], side, step) for x in _starts(padded.shape[-1], side, step)]
    total = torch.zeros(len(model.class_names), *padded.shape[-2:], device=image.device)
    count = torch.zeros(1, *padded.shape[-2:], device=image.device)
    for k in range(0, len(corners), WINDOWS_PER_BATCH):
        chunk = corners[k : k + WINDOWS_PER_BATCH]
        logits = model.logits(torch.stack([padded[:, y : y + side, x : x + side] for y, x in chunk]))
        for (y, x), window in zip(chunk, logits.float(), strict=True):
            total[:, y : y + side, x : x + side] += window
            count[:, y : y + side, x : x + side] += 1
    return (total / count)[:, :height, :width]


def _starts(length: int, side: int, step: int) -> list[int]:
    return [*range(0, length - side, step), length - side]


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF  # noqa: N812

    return image if tuple(image.shape[-2:]) == size else TF.resize(image, list(size), antialias=True)


# ------------------------------------------------------------------------------------------------ scoring


class SegmentationEvaluator:
    """The segment task's `compute_metrics`: `collect` runs a model over a loader of `IndexedImages` into one record
    per image (its confusion counts, summed cross-entropy and counted pixels; the predicted mask of the first
    SAMPLES), `__call__` scores records (one per image, however often a sharded loader repeated it) and keeps the
    full report in `.last`."""

    def __init__(self, class_names: list[str], ignore_index: int, mode: str = "resize", stride: float = 2 / 3):
        self.class_names, self.ignore_index, self.mode, self.stride = list(class_names), ignore_index, mode, stride
        self.last: dict[str, Any] = {}

    def collect(self, model: Segmenter, loader, prepare: Callable | None = None) -> list[dict]:
        from visiontune.run.records import collect_records

        def per_batch(batch: dict) -> list[dict]:
            logits = image_logits(model, batch["images"], self.mode, self.stride)
            if getattr(model, "universal", False):  # mask-query scores: their log for the loss, the same argmax
                logits = [scores_as_logits(found) for found in logits]
            return [self._record(*found) for found in zip(logits, batch["masks"], batch["index"].tolist(), strict=True)]

        return collect_records(model, loader, prepare, per_batch)

    def _record(self, logits: torch.Tensor, mask: torch.Tensor, index: int) -> dict:
        pred = logits.argmax(0)
        matrix = pixel_confusion(pred, mask, len(self.class_names), self.ignore_index).reshape(-1)
        cells = matrix.nonzero().reshape(-1)
        loss = F.cross_entropy(logits[None].float(), mask[None], ignore_index=self.ignore_index, reduction="sum")
        record = {
            "index": index,
            "cells": cells,
            "counts": matrix[cells],
            "loss": float(loss),
            "pixels": int((mask != self.ignore_index).sum()),
        }
        if index < SAMPLES:
            record["mask"] = encode_mask(pred.cpu().numpy())
        return record

    def __call__(self, records: list[dict]) -> dict[str, float]:
        by_index = {r["index"]: r for r in records}
        n = len(self.class_names)
        matrix = torch.zeros(n * n, dtype=torch.long)
        for r in by_index.values():
            matrix.index_add_(0, r["cells"].cpu(), r["counts"].cpu())
        report = segmentation_scores(matrix.reshape(n, n), self.class_names)
        pixels = sum(r["pixels"] for r in by_index.values())
        report["metrics"]["loss"] = sum(r["loss"] for r in by_index.values()) / max(pixels, 1)
        report["samples"] = [{"index": i, "mask": by_index[i]["mask"]} for i in sorted(by_index) if i < SAMPLES]
        report["images"] = len(by_index)
        self.last = report
        return report["metrics"]


def encode_mask(mask: np.ndarray) -> str:
    """A class-id mask as base64 PNG text (8-bit, 16-bit over 255 classes): small enough for eval/*.json."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(mask.astype(mask_dtype(mask))).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_dtype(mask: np.ndarray) -> type:
    """The PNG sample type of a class-id mask: 8-bit, or 16-bit past 255 classes."""
    return np.uint8 if mask.max(initial=0) < 256 else np.uint16


def decode_png_mask(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))).astype(np.int64)
