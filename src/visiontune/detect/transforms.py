"""Box-aware augmentation on torchvision `transforms.v2`: presets none / light / strong.

Every pipeline takes and returns `(image, target)` where `target["boxes"]` is a `tv_tensors.BoundingBoxes` (xyxy)
with `labels` and `iscrowd` in step. Images are resized so the LONGEST side is `image_size` (aspect kept, no
padding: detectors pad their batches themselves). Boxes are clamped to the image after every geometric step and
boxes that become degenerate (under 1 px wide or high) are dropped with their labels and crowd flags.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

PRESETS = ("none", "light", "strong")


def detection_transforms(preset: str, image_size: int, train: bool, hflip: float = 0.5) -> v2.Compose:
    """The pipeline for `preset` (`train=False` or preset none: resize only). light: horizontal flip with
    probability `hflip` (set 0 where a mirror image is another class, e.g. digits) and colour jitter; strong adds
    scale jitter (0.5-1.5x of `image_size`), an SSD-style random IoU crop and stronger colour jitter."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augment preset {preset!r}; use one of {PRESETS}")
    augment = train and preset != "none"
    steps: list = [v2.ToImage(), *(_geometric(preset, image_size, hflip) if augment else [])]
    steps.append(v2.Resize(size=None, max_size=image_size, antialias=True))
    if augment:  # after the resize: colour work on a large photo would cost more than the rest of the pipeline
        steps.append(_photometric(preset))
    steps += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=box_fields),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)


def _geometric(preset: str, image_size: int, hflip: float) -> list:
    steps: list = []
    if preset == "strong":
        steps += [
            v2.ScaleJitter((image_size, image_size), scale_range=(0.5, 1.5), antialias=True),
            IoUCropIfBoxes(),
            v2.ClampBoundingBoxes(),
        ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    return steps


def _photometric(preset: str) -> v2.ColorJitter:
    """light: brightness, contrast, saturation +-20 %; strong: +-40 % and hue +-0.04 (hue costs ~4x the rest)."""
    if preset == "light":
        return v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)
    return v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.04)


def box_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """What SanitizeBoundingBoxes filters along with the boxes: the target's labels and crowd flags (a module
    function, not a lambda, so the pipeline pickles into DataLoader workers)."""
    target = inputs[1] if isinstance(inputs, tuple | list) else inputs
    return tuple(target[key] for key in ("labels", "iscrowd") if key in target)


class IoUCropIfBoxes(v2.RandomIoUCrop):
    """RandomIoUCrop that leaves an image without boxes as it is: torchvision's would loop until it draws the
    'no crop' option, since no crop can satisfy an IoU constraint without boxes."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        boxes = next((x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)), None)
        if boxes is None or boxes.shape[0] == 0:
            return {}
        return super().make_params(flat_inputs)
