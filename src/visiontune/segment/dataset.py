"""torch Dataset over a `MaskDataset` (image + class-id mask, transformed together) and the segmentation collator."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import tv_tensors

from visiontune.core.dataset import EpochSeed
from visiontune.core.errors import SampleError
from visiontune.detect.dataset import load_image, seeded
from visiontune.segment.data import MaskDataset, decode_mask


class SegmentationDataset(torch.utils.data.Dataset):
    """Item i -> (image: tv_tensors.Image float [3, H, W] in 0..1, mask: tv_tensors.Mask int64 [H, W] of class ids,
    `data.ignore_index` where no class counts). `transform` takes and returns (image, mask) (segment/transforms.py);
    None keeps both as decoded (the image then still becomes float 0..1). `seed` (training): the random transforms
    draw per item from (seed, epoch, index) (core.dataset.EpochSeed), so a resumed run and any number of loader
    workers augment item i of epoch e alike; the task's SetEpoch callback moves the epoch."""

    def __init__(self, data: MaskDataset, transform: Callable | None, max_image_pixels: int, seed: int | None = None):
        self.data, self.transform, self.max_image_pixels = data, transform, max_image_pixels
        self.rng = EpochSeed(seed) if seed is not None else None

    def set_epoch(self, epoch: int) -> None:
        if self.rng is not None:
            self.rng.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def mask(self, i: int) -> tv_tensors.Mask:
        from visiontune.segment.data import BadMask

        record = self.data.records[i]
        try:
            return tv_tensors.Mask(torch.from_numpy(decode_mask(self.data, record)))
        except BadMask as err:
            hint = "fix or remove it (data.on_bad_sample=skip drops bad samples)"
            raise SampleError(f"{record.mask} {err}; {hint}.") from None

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image, mask = tv_tensors.Image(load_image(self.data, i, self.max_image_pixels)), self.mask(i)
        if self.transform is not None:
            with seeded(self.rng, i):
                image, mask = self.transform(image, mask)
        if image.dtype == torch.uint8:
            image = tv_tensors.Image(image.float() / 255)
        return image, mask


def segmentation_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"pixel_values": float [B, 3, H, W], "labels": int64 [B, H, W]}: the names transformers' segmentation models
    take. Items must share one size (the transforms resize / crop every item to image_size x image_size)."""
    images, masks = zip(*batch, strict=True)
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) > 1:
        raise ValueError(f"segmentation batch mixes image sizes {sorted(sizes)}; resize items to one size first")
    return {
        "pixel_values": torch.stack([image.as_subclass(torch.Tensor) for image in images]),
        "labels": torch.stack([mask.as_subclass(torch.Tensor).long() for mask in masks]),
    }
