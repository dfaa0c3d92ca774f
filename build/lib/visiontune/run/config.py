"""The runner's recipe sections: `train` (the loop, checkpoints, validation) and `track` (TensorBoard, W&B).

`TrainConfig` holds the keys every task honours; `EmaTrainConfig` and `ClassifierTrainConfig` add the keys only
some tasks honour, so a task's schema never holds a key it would ignore (`visiontune.recipe` names the task that
would use a refused key). A task that needs other defaults subclasses one of them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


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
    eval_steps: int | None = Field(None, gt=0, description="Evaluate and checkpoint every N steps; else every epoch.")
    metric: str = Field("accuracy", description="Validation metric that selects the best checkpoint.")
    early_stopping_patience: int | None = Field(None, gt=0)
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(10, gt=0)
    resume: bool = False
    cpu: bool | None = Field(None, description="Force CPU; default: CPU when no GPU is visible.")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json).")
    fsdp: str | None = Field(None, description="FSDP policy for transformers, e.g. `full_shard auto_wrap`.")


class EmaTrainConfig(TrainConfig):
    """`train` for tasks that can keep an exponential moving average of the weights (the runner compares it with
    the trained weights on validation and keeps the better)."""

    ema: EmaConfig | None = None


class ClassifierTrainConfig(EmaTrainConfig):
    """`train` for tasks whose loss is a classifier's cross-entropy (classify, the CLIP classifier tasks)."""

    label_smoothing: float = Field(0.0, ge=0, lt=1)


class TrackConfig(Strict):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "visiontune"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
