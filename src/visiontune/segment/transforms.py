"""Mask-aware augmentation on torchvision `transforms.v2`: presets none / light / strong.

Every pipeline takes and returns `(image, mask)`: a `tv_tensors.Image` and a `tv_tensors.Mask` of class ids. v2
resizes a Mask with nearest-neighbour whatever interpolation the step names, so no mask ever holds a blend of two
ids (bilinear for the pixels). Every pipeline ends at image_size x image_size (square, aspect not kept: what
transformers' SegFormer image processor does), so a batch stacks; pixels padded in by a crop are black in the image
and `ignore_index` in the mask, so they count in neither the loss nor the metrics.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

PRESETS = ("none", "light", "strong")
CROP_SCALE = (0.5, 1.0)  # light: the area of the random resized crop, as a fraction of the image
SCALE_RANGE = (0.5, 2.0)  # strong: scale jitter of the image (fit into image_size) before the crop, as in mmseg


def segmentation_transforms(
    preset: str, image_size: int, train: bool, hflip: float = 0.5, ignore_index: int = 255
) -> v2.Compose:
    """The pipeline for `preset` (`train=False` or preset none: resize to image_size x image_size only).
    light: a random resized crop (CROP_SCALE of the area, aspect 3/4-4/3), a horizontal flip with probability `hflip`
    (0 where a mirror image is another class, e.g. digits) and colour jitter; strong: scale jitter (SCALE_RANGE),
    a random image_size crop padded with `ignore_index` where the image is smaller, the flip and stronger jitter."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augment preset {preset!r}; use one of {PRESETS}")
    steps: list = [v2.ToImage()]
    if train and preset != "none":
        steps += _geometric(preset, image_size, hflip, ignore_index)
        steps.append(_photometric(preset))  # after the crop: colour work on the smaller image costs less
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    steps.append(v2.ToDtype(torch.float32, scale=True))  # a torch.dtype converts images only, masks stay ids
    return v2.Compose(steps)


def _geometric(preset: str, image_size: int, hflip: float, ignore_index: int) -> list:
    if preset == "light":
        steps: list = [v2.RandomResizedCrop(image_size, scale=CROP_SCALE, antialias=True)]
    else:
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
        steps = [
            v2.ScaleJitter((image_size, image_size), scale_range=SCALE_RANGE, antialias=True),
            v2.RandomCrop(image_size, pad_if_needed=True, fill=fill),
        ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    return steps


def _photometric(preset: str) -> v2.ColorJitter:
    """light: brightness, contrast, saturation +-20 %; strong: +-40 % and hue +-0.04 (detection's presets)."""
    from visiontune.detect.transforms import _photometric as shared

    return shared(preset)
