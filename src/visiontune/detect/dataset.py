"""torch Dataset over a `BoxDataset` and the detection collator (lists, not stacked: images differ in size)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import tv_tensors

from visiontune.core.errors import SampleError
from visiontune.core.images import BadImage, hf_image_value, open_image
from visiontune.detect.data import BoxDataset, BoxRecord


class DetectionDataset(torch.utils.data.Dataset):
    """Item i -> (image: tv_tensors.Image float [3, H, W] in 0..1, target: {"boxes": BoundingBoxes xyxy, "labels":
    long, "iscrowd": bool, "image_id": i, "orig_size": (h, w) as displayed}). `transform` takes and returns
    (image, target) (detect/transforms.py); None keeps the image as decoded."""

    def __init__(self, data: BoxDataset, transform: Callable | None, max_image_pixels: int):
        self.data, self.transform, self.max_image_pixels = data, transform, max_image_pixels

    def __len__(self) -> int:
        return len(self.data)

    def load(self, i: int) -> Image.Image:
        """The image as displayed (EXIF orientation applied), RGB; a SampleError sentence if it cannot be used."""
        record = self.data.records[i]
        try:
            source = record.image
            if record.row is not None:
                source = hf_image_value(self.data.hf_dataset, record.row, self.data.image_column)
            image = open_image(source, self.max_image_pixels)
        except BadImage as err:
            hint = "fix or remove it (data.on_bad_sample=skip drops bad samples)"
            raise SampleError(f"{record.image} {err}; {hint}.") from None
        if image.size != (record.width, record.height):
            raise SampleError(
                f"{record.image} is {image.width}x{image.height} now but was {record.width}x{record.height} when "
                "its boxes were read; restart the run so the data is read again."
            )
        return image

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict]:
        record = self.data.records[i]
        image = tv_tensors.Image(self.load(i))
        target = make_target(record, i)
        if self.transform is not None:
            image, target = self.transform(image, target)
        if image.dtype == torch.uint8:
            image = tv_tensors.Image(image.float() / 255)
        return image, target


def make_target(record: BoxRecord, image_id: int) -> dict:
    boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(record.height, record.width)),
        "labels": torch.tensor(record.labels, dtype=torch.long),
        "iscrowd": torch.tensor(record.iscrowd, dtype=torch.bool),
        "image_id": image_id,
        "orig_size": (record.height, record.width),
    }


def detection_collate(batch: list[tuple]) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
