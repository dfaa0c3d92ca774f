"""Typed recipe configs. One pydantic model per task; unknown keys are errors (`extra="forbid"`).

The stable contract (issue #2): `task`, `model`, `output_dir`, `data.train`, `data.val`, `data.on_bad_sample`,
`train.epochs`, `train.max_steps`, `train.batch_size`, `train.lr`. Everything else may evolve.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AugmentConfig(Strict):
    preset: Literal["none", "light", "strong"] = "light"
    hflip: float | None = Field(None, ge=0, le=1, description="Horizontal-flip probability; preset default if unset.")
    policy: Literal["randaugment", "trivialaugment"] = "randaugment"
    mixup: float | None = Field(None, ge=0, description="Mixup alpha; 0 disables; `strong` uses 0.2 if unset.")
    cutmix: float | None = Field(None, ge=0, description="CutMix alpha; 0 disables; `strong` uses 1.0 if unset.")


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
    max_image_pixels: int = Field(89_478_485, gt=0, description="Decompression-bomb guard (PIL's default).")
    image_column: str | None = None
    label_column: str | None = None
    class_names: list[str] | None = Field(None, description="Fixes the class list and order; labels outside it fail.")


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | Literal["auto"] = "auto"


class UnfreezeStep(Strict):
    epoch: int = Field(ge=0, description="From this epoch on (0-based) ...")
    blocks: int | Literal["all"] = Field(description="... train the head plus the last N blocks (or all).")


class TuneConfig(Strict):
    method: Literal["full", "linear_probe", "gradual_unfreeze", "lora"] = "full"
    unfreeze: list[UnfreezeStep] = Field(
        default_factory=lambda: [
            UnfreezeStep(epoch=0, blocks=0),
            UnfreezeStep(epoch=1, blocks=2),
            UnfreezeStep(epoch=2, blocks="all"),
        ],
        description="Schedule for `gradual_unfreeze`.",
    )
    layer_decay: float | None = Field(None, gt=0, le=1, description="Layer-wise LR decay factor (e.g. 0.75).")
    lora: LoraConfig = LoraConfig()

    @field_validator("unfreeze")
    @classmethod
    def _sorted(cls, steps: list[UnfreezeStep]) -> list[UnfreezeStep]:
        if [s.epoch for s in steps] != sorted({s.epoch for s in steps}):
            raise ValueError("tune.unfreeze epochs must be distinct and increasing")
        return steps


class EmaConfig(Strict):
    decay: float = Field(0.999, gt=0, lt=1)


class TrainConfig(Strict):
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, description="Stops after this many optimiser steps if > 0 (overrides epochs).")
    batch_size: int = Field(32, gt=0, description="Per device.")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema: EmaConfig | None = None
    eval_steps: int | None = Field(None, gt=0, description="Evaluate and checkpoint every N steps; else every epoch.")
    metric: str = Field("accuracy", description="Validation metric that selects the best checkpoint.")
    early_stopping_patience: int | None = Field(None, gt=0)
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(10, gt=0)
    resume: bool = False
    cpu: bool | None = Field(None, description="Force CPU; default: CPU when no GPU is visible.")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json).")
    fsdp: str | None = Field(None, description="FSDP policy for transformers, e.g. `full_shard auto_wrap`.")


class TrackConfig(Strict):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "visiontune"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"


class ClassifyConfig(Strict):
    """Recipe for `task: classify` — fine-tune an image classifier."""

    task: Literal["classify"] = "classify"
    model: str = Field(description="builtin:NAME, timm:NAME, a hub id, or a local folder.")
    pretrained: bool = Field(True, description="Load pretrained weights (timm:NAME); false builds from scratch.")
    output_dir: str
    seed: int = 42
    data: DataConfig
    tune: TuneConfig = TuneConfig()
    train: TrainConfig = TrainConfig()
    track: TrackConfig = TrackConfig()

    @model_validator(mode="after")
    def _check(self) -> ClassifyConfig:
        if self.train.ema is not None and self.tune.method == "lora":
            raise ValueError("train.ema is not supported with tune.method=lora; remove one of them")
        return self
