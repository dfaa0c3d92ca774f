"""Typed recipe for `task: classify`; unknown keys are errors (`extra="forbid"`).

The stable contract (issue #2): `task`, `model`, `output_dir`, `data.train`, `data.val`, `data.on_bad_sample`,
`train.epochs`, `train.max_steps`, `train.batch_size`, `train.lr`. Everything else may evolve.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from visiontune.core.config import PIL_MAX_PIXELS, AugmentConfig
from visiontune.run.config import ClassifierTrainConfig, Inert, Strict, TrackConfig, refuse_inert, val_split_rule


class DataConfig(Strict):
    train: str = Field(description="Image folder, .csv/.jsonl file, saved `datasets` folder, hub id, or builtin:NAME.")
    val: str | None = None
    val_split: float = Field(0.1, gt=0, lt=1, description="Held-out fraction when `val` is not given (stratified).")
    image_size: int | None = Field(None, gt=0, description="Input size; the backbone's pretrained size if unset.")
    augment: AugmentConfig = AugmentConfig()
    workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader workers; auto: 0 for in-memory data, else up to 4 by CPU count."
    )
    on_bad_sample: Literal["error", "skip"] = "error"
    max_image_pixels: int = Field(PIL_MAX_PIXELS, gt=0, description="Decompression-bomb guard (PIL's default).")
    image_column: str | None = None
    label_column: str | None = None
    class_names: list[str] | None = Field(None, description="Fixes the class list and order; labels outside it fail.")

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> DataConfig:
        refuse_inert(self, info, [val_split_rule(self)], prefix="data.")
        return self


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | Literal["auto"] = "auto"


class UnfreezeStep(Strict):
    epoch: int = Field(ge=0, description="From this epoch on (0-based) ...")
    blocks: int | Literal["all"] = Field(description="... train the head plus the last N blocks (or all).")


class MethodTuneConfig(Strict):
    """The `tune` keys of every task that trains by a freezing plan (classify, detect, segment): the method, gradual
    unfreezing's schedule and LoRA's settings. A subclass adds its own keys and their `extra_rules`."""

    method: Literal["full", "linear_probe", "gradual_unfreeze", "lora"] = "full"
    unfreeze: list[UnfreezeStep] = Field(
        default_factory=lambda: [
            UnfreezeStep(epoch=0, blocks=0),
            UnfreezeStep(epoch=1, blocks=2),
            UnfreezeStep(epoch=2, blocks="all"),
        ],
        description="Schedule for `gradual_unfreeze`.",
    )
    lora: LoraConfig = LoraConfig()

    @field_validator("unfreeze")
    @classmethod
    def _sorted(cls, steps: list[UnfreezeStep]) -> list[UnfreezeStep]:
        if [s.epoch for s in steps] != sorted({s.epoch for s in steps}):
            raise ValueError("tune.unfreeze epochs must be distinct and increasing")
        return steps

    def extra_rules(self) -> list[Inert]:
        return []

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> MethodTuneConfig:
        method = self.method
        rules = [
            Inert(("lora",), method != "lora", "with tune.method: lora", "set tune.method: lora"),
            Inert(
                ("unfreeze",),
                method != "gradual_unfreeze",
                "with tune.method: gradual_unfreeze",
                "set tune.method: gradual_unfreeze",
            ),
            *self.extra_rules(),
        ]
        refuse_inert(self, info, rules, prefix="tune.")
        return self


class TuneConfig(MethodTuneConfig):
    layer_decay: float | None = Field(None, gt=0, le=1, description="Layer-wise LR decay factor (e.g. 0.75).")

    def extra_rules(self) -> list[Inert]:
        # LoRA builds no layer groups; a linear probe trains only the head, which keeps the full LR.
        return [
            Inert(
                ("layer_decay",),
                self.method not in ("full", "gradual_unfreeze"),
                "with tune.method full or gradual_unfreeze (lora and linear_probe train no decayed layer)",
                "use one of those methods",
            )
        ]


# What a classifier's validation reports (classify/metrics.py; top5_accuracy with five classes or more).
CLASSIFIER_METRICS = ("accuracy", "macro_f1", "top5_accuracy", "loss")


class ClassifyConfig(Strict):
    """Recipe for `task: classify` — fine-tune an image classifier."""

    task: Literal["classify"] = "classify"
    model: str = Field(description="builtin:NAME, timm:NAME, a hub id, or a local folder.")
    pretrained: bool = Field(True, description="Load pretrained weights (timm:NAME); false builds from scratch.")
    output_dir: str
    seed: int = 42
    data: DataConfig
    tune: TuneConfig = TuneConfig()
    train: ClassifierTrainConfig = ClassifierTrainConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        return list(CLASSIFIER_METRICS)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> ClassifyConfig:
        if self.train.ema is not None and self.tune.method == "lora":
            raise ValueError("train.ema is not supported with tune.method=lora; remove one of them")
        # Only timm builds a model without its weights; builtin:, folders and hub ids always load theirs.
        timm = Inert(
            ("pretrained",),
            not self.model.startswith("timm:"),
            "with a timm:NAME model (builtin:, folders and hub ids load their own weights)",
            "give model: timm:NAME",
        )
        refuse_inert(self, info, [timm])
        return self
