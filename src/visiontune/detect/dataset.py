"""torch Dataset over a `BoxDataset` and the detection collator (lists, not stacked: images differ in size)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from transformers import TrainerCallback

from visiontune.core.dataset import EpochSeed
from visiontune.core.errors import SampleError
from visiontune.core.images import BadImage, hf_image_value, open_image
from visiontune.detect.data import BoxDataset, BoxRecord


class DetectionDataset(torch.utils.data.Dataset):
    """Item i -> (image: tv_tensors.Image float [3, H, W] in 0..1, target: {"boxes": BoundingBoxes xyxy, "labels":
    long, "iscrowd": bool, "image_id": i, "orig_size": (h, w) as displayed}). `transform` takes and returns
    (image, target) (detect/transforms.py); None keeps the image as decoded. `seed` (training): the random transforms
    draw per item from core.dataset's `EpochSeed` (seed, epoch, index), so a resumed run and any number of loader
    workers augment item i of epoch e alike; call `set_epoch` (core.dataset.SetEpoch)."""

    def __init__(self, data: BoxDataset, transform: Callable | None, max_image_pixels: int, seed: int | None = None):
        self.data, self.transform, self.max_image_pixels = data, transform, max_image_pixels
        self.rng = EpochSeed(seed) if seed is not None else None

    def set_epoch(self, epoch: int) -> None:
        if self.rng is not None:
            self.rng.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def load(self, i: int) -> Image.Image:
        return load_image(self.data, i, self.max_image_pixels)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict]:
        with seeded(self.rng, i):
            return self.item(i)

    def item(self, i: int) -> tuple[tv_tensors.Image, dict]:
        """Item i transformed with whatever torch's generator holds now (MosaicDataset draws its tiles this way)."""
        record = self.data.records[i]
        image = tv_tensors.Image(self.load(i))
        target = make_target(record, i)
        if self.transform is not None:
            image, target = self.transform(image, target)
        if image.dtype == torch.uint8:
            image = tv_tensors.Image(image.float() / 255)
        return image, target


def seeded(rng: EpochSeed | None, i: int) -> contextlib.AbstractContextManager:
    return rng.fixed(i) if rng is not None else contextlib.nullcontext()


def load_image(data: Any, i: int, max_image_pixels: int) -> Image.Image:
    """Record i's image as displayed (EXIF orientation applied), RGB; a SampleError sentence if it cannot be used.
    `data`: a BoxDataset, or any set whose records carry image / row / width / height (segmentation's MaskDataset)."""
    record = data.records[i]
    try:
        source = record.image
        if record.row is not None:
            source = hf_image_value(data.hf_dataset, record.row, data.image_column)
        image = open_image(source, max_image_pixels)
    except BadImage as err:
        hint = "fix or remove it (data.on_bad_sample=skip drops bad samples)"
        raise SampleError(f"{record.image} {err}; {hint}.") from None
    if image.size != (record.width, record.height):
        raise SampleError(
            f"{record.image} is {image.width}x{image.height} now but was {record.width}x{record.height} when "
            "its labels were read; restart the run so the data is read again."
        )
    return image


def make_target(record: BoxRecord, image_id: int) -> dict:
    """The target of one record; with instance masks, "masks": tv_tensors.Mask uint8 [objects, H, W], in step with
    the boxes (v2 transforms move them together, nearest-neighbour, and SanitizeBoundingBoxes drops them together)."""
    boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(record.height, record.width)),
        "labels": torch.tensor(record.labels, dtype=torch.long),
        "iscrowd": torch.tensor(record.iscrowd, dtype=torch.bool),
        "image_id": image_id,
        "orig_size": (record.height, record.width),
    }
    if record.segments is not None:
        from visiontune.detect.masks import instance_masks

        target["masks"] = tv_tensors.Mask(torch.from_numpy(instance_masks(record)))
    return target


def detection_collate(batch: list[tuple]) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


MIN_VISIBLE = 0.25  # of a box's area that must stay inside a mosaic window
GREY = 0.45  # the canvas round the tiles (Ultralytics fills with 114/255)


class MosaicDataset(torch.utils.data.Dataset):
    """Mosaic augmentation (YOLOv4 / Ultralytics) around a training DetectionDataset: with probability `p` an item
    is four items (its own and three random others, each through the dataset's transform, so at most
    `image_size` a side) placed round a random point on a grey 2s x 2s canvas, cut to the s x s window centred on
    that point. Boxes (and instance masks) move with their images and are clipped to the window; one with under
    MIN_VISIBLE of its area left in it is dropped, its label, crowd flag and mask with it. Everything item i draws
    (whether, which tiles, where, each tile's own augmentation) comes from the dataset's per-item `EpochSeed` stream
    when it has one. `close` (shared memory, set by `CloseMosaic`): plain items, as in the last epochs of a run."""

    def __init__(self, dataset: DetectionDataset, image_size: int, p: float = 0.5):
        self.dataset, self.size, self.p = dataset, image_size, p
        self.close = torch.zeros((), dtype=torch.bool).share_memory_()  # persistent workers must see it change

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict]:
        with seeded(self.dataset.rng, i):
            if len(self.dataset) < 2 or bool(self.close) or float(torch.rand(())) >= self.p:
                return self.dataset.item(i)
            return self._mosaic(i)

    def _mosaic(self, i: int) -> tuple[tv_tensors.Image, dict]:
        s = self.size
        picks = [i, *torch.randint(len(self.dataset), (3,)).tolist()]
        xc, yc = (int(v) for v in torch.randint(s // 2, 3 * s // 2 + 1, (2,)))
        left, top = xc - s // 2, yc - s // 2
        window = torch.full((3, s, s), GREY)
        parts = [
            self._place(window, *self.dataset.item(j), corner, xc - left, yc - top) for corner, j in enumerate(picks)
        ]
        boxes = torch.cat([p["boxes"] for p in parts])
        clipped = boxes.clamp(0, s)
        # Keep a box when at least MIN_VISIBLE of it is in the window: a sliver of an object is not the object.
        wide = ((clipped[:, 2:] - clipped[:, :2]) >= 1).all(dim=1)
        keep = wide & (_area(clipped) >= MIN_VISIBLE * _area(boxes))
        target = {
            "boxes": tv_tensors.BoundingBoxes(clipped[keep], format="XYXY", canvas_size=(s, s)),
            "labels": torch.cat([p["labels"] for p in parts])[keep],
            "iscrowd": torch.cat([p["iscrowd"] for p in parts])[keep],
            "image_id": i,
            "orig_size": (s, s),
        }
        if "masks" in parts[0]:  # every item of a set read with masks has them
            target["masks"] = tv_tensors.Mask(torch.cat([p["masks"] for p in parts])[keep])
        return tv_tensors.Image(window), target

    @staticmethod
    def _place(window: torch.Tensor, image: torch.Tensor, target: dict, corner: int, xc: int, yc: int) -> dict:
        """Paste `image` with one corner on (xc, yc) of the window (0 above-left, 1 above-right, 2 below-left,
        3 below-right) and return its target moved there. Pasting straight into the window gives the pixels that
        the canvas cut to it would: the window lies inside the canvas."""
        h, w = image.shape[-2:]
        x0, y0 = xc - w if corner in (0, 2) else xc, yc - h if corner in (0, 1) else yc
        s = window.shape[-1]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, s), min(y0 + h, s)
        if cx1 > cx0 and cy1 > cy0:
            window[:, cy0:cy1, cx0:cx1] = image[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        placed = {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4) + shift,
            "labels": target["labels"],
            "iscrowd": target["iscrowd"],
        }
        if "masks" in target:
            masks = target["masks"].as_subclass(torch.Tensor)
            moved = torch.zeros((masks.shape[0], s, s), dtype=masks.dtype)
            if cx1 > cx0 and cy1 > cy0:
                moved[:, cy0:cy1, cx0:cx1] = masks[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            placed["masks"] = moved
        return placed


class CloseMosaic(TrainerCallback):
    """Turns mosaic off for the last `epochs` epochs of the run (Ultralytics' close_mosaic: the detector ends on
    images like the ones it will see). Set when each epoch begins, from the Trainer's own epoch count, so a resumed
    run closes it at the same epoch."""

    def __init__(self, dataset: MosaicDataset, epochs: int):
        self.dataset, self.epochs = dataset, epochs

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        self.dataset.close.fill_(epoch >= state.num_train_epochs - self.epochs)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
