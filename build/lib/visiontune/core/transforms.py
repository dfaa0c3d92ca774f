"""Augmentation presets on torchvision transforms; batch-level mixup/cutmix via torchvision.transforms.v2."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from visiontune.core.config import AugmentConfig, ImageAugmentConfig


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects as input; saved with the model so predict/eval reproduce it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


def _interp(name: str) -> v2.InterpolationMode:
    return v2.InterpolationMode.BICUBIC if name == "bicubic" else v2.InterpolationMode.BILINEAR


def _finish(pre: Preprocess) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]


def eval_transform(pre: Preprocess) -> v2.Compose:
    size = pre.image_size
    return v2.Compose([v2.Resize(size, interpolation=_interp(pre.interpolation)), v2.CenterCrop(size), *_finish(pre)])


def train_transform(pre: Preprocess, aug: ImageAugmentConfig) -> v2.Compose:
    if aug.preset == "none":
        return eval_transform(pre)
    size, interp = pre.image_size, _interp(pre.interpolation)
    light = aug.preset == "light"
    steps: list = [v2.RandomResizedCrop(size, scale=(0.7, 1.0) if light else (0.35, 1.0), interpolation=interp)]
    hflip = aug.hflip if aug.hflip is not None else 0.5
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if not light:
        steps.append(v2.RandAugment(interpolation=interp) if aug.policy == "randaugment" else v2.TrivialAugmentWide())
    return v2.Compose(steps + _finish(pre))


def batch_mixer(aug: AugmentConfig, num_classes: int) -> v2.Transform | None:
    """Mixup / CutMix on whole batches (soft labels). `strong` turns both on unless the recipe says otherwise."""
    mixup = aug.mixup if aug.mixup is not None else (0.2 if aug.preset == "strong" else 0.0)
    cutmix = aug.cutmix if aug.cutmix is not None else (1.0 if aug.preset == "strong" else 0.0)
    mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + (
        [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
    )
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def with_image_size(pre: Preprocess, size: int | None) -> Preprocess:
    """The same preprocessing at the recipe's `data.image_size` (unchanged when unset)."""
    return pre if size is None else Preprocess(size, pre.mean, pre.std, pre.interpolation)
