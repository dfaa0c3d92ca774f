"""Recipe sections shared by the image tasks (classify, CLIP): augmentation. No torch here, so
`visiontune validate` stays fast."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from visiontune.run.config import Inert, Strict, refuse_inert

PIL_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit: the default `data.max_image_pixels`


class ImageAugmentConfig(Strict):
    """Per-image augmentation (every image task)."""

    preset: Literal["none", "light", "strong"] = "light"
    hflip: float | None = Field(None, ge=0, le=1, description="Horizontal-flip probability; preset default if unset.")
    policy: Literal["randaugment", "trivialaugment"] = "randaugment"

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> ImageAugmentConfig:
        rules = [
            Inert(
                ("hflip",),
                self.preset == "none",
                "with data.augment.preset light or strong (preset none does not augment)",
                "choose one of those presets",
            ),
            Inert(
                ("policy",),
                self.preset != "strong",
                "with data.augment.preset: strong",
                "set data.augment.preset: strong",
            ),
        ]
        refuse_inert(self, info, rules, prefix="data.augment.")
        return self


class AugmentConfig(ImageAugmentConfig):
    """Per-image augmentation plus batch mixing (the classifier tasks: mixed labels need a classification loss)."""

    mixup: float | None = Field(None, ge=0, description="Mixup alpha; 0 disables; `strong` uses 0.2 if unset.")
    cutmix: float | None = Field(None, ge=0, description="CutMix alpha; 0 disables; `strong` uses 1.0 if unset.")
