"""The runner's recipe sections: `train` (the loop, checkpoints, validation) and `track` (TensorBoard, W&B).

`TrainConfig` holds the keys every task honours; `EmaTrainConfig` and `ClassifierTrainConfig` add the keys only
some tasks honour, so a task's schema never holds a key it would ignore (`visiontune.recipe` names the task that
would use a refused key). A task that needs other defaults subclasses one of them.

A key the schema holds can still be inert under the recipe's other settings (`train.momentum` with AdamW): the
configs refuse such keys when the recipe writes them (`Inert` rules, `refuse_inert`); a default never triggers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

# Validation context under which inert keys are refused: `visiontune.recipe.parse_config` validates every recipe
# with it. Code that builds a config from another config's full dump (clip_continual's per-task configs) writes
# every key by construction, so it validates without it.
RECIPE_CONTEXT = {"recipe": True}
INERT_ERROR = "inert_key"  # the pydantic error type of a refusal; its ctx["keys"] lists the refused dotted keys
DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"  # package data: in the wheel


class Strict(BaseModel):
    # allow_inf_nan: `epochs: .inf` would pass and then overflow the step count.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads `batch_size: true` as 1; a number written as true/false is a mistake, not a number."""
        if isinstance(value, bool) and info.field_name and not _admits_bool(cls.model_fields[info.field_name]):
            raise ValueError("is true/false where a number or text belongs; write the value itself")
        return value


def _admits_bool(field: Any) -> bool:
    annotation = field.annotation
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return any(m is bool or m is Any for m in members)


DEEPSPEED = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))  # built-in names for train.deepspeed


def deepspeed_file(value: str) -> Path:
    """`train.deepspeed`'s file: a built-in name's packaged JSON, else the value as a path (`~` expanded)."""
    return DEEPSPEED_DIR / f"{value}.json" if value in DEEPSPEED else Path(value).expanduser()


def zero_stage(value: str | None) -> int:
    """The ZeRO stage of a `train.deepspeed` value (0: none, or a file TrainConfig reports as unreadable)."""
    import json

    if not value:
        return 0
    try:
        return int(json.loads(deepspeed_file(value).read_text()).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


@dataclass(frozen=True)
class Inert:
    """Keys (dotted, relative to the validated model; a section stands for the keys written inside it) that act on
    nothing when `inert` holds: they act only `when` ("with train.optimizer: sgd"); `fix` is the other way out."""

    keys: tuple[str, ...]
    inert: bool
    when: str
    fix: str


def written(model: BaseModel, key: str) -> list[str]:
    """The dotted keys at or inside `key` that the recipe wrote (explicitly set) with other than their default. A
    key written as null or as its default is not counted: that is what leaving it out means (and a run's saved
    config.yaml writes every key). A section counts by the keys written inside it; an empty one counts only when it
    is optional (`wise_ft: {}` turns WiSE-FT on, `tune: {}` says nothing)."""
    node: Any = model
    parent: Any = None
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in node.model_fields_set:
            return []
        parent, node = node, getattr(node, part)
    if node is None:
        return []
    field = type(parent).model_fields[key.rsplit(".", 1)[-1]]
    if (
        not isinstance(node, BaseModel)
        and not field.is_required()
        and node == field.get_default(call_default_factory=True)
    ):
        return []
    if isinstance(node, BaseModel):
        inside = [
            f"{key}.{k}" for name in node.model_fields if name in node.model_fields_set for k in written(node, name)
        ]
        return inside or ([key] if field.default is None else [])
    return [key]


def refuse_inert(model: BaseModel, info: ValidationInfo, rules: Iterable[Inert], prefix: str = "") -> None:
    """One sentence per rule whose written keys would act on nothing; only when validating a recipe."""
    if not (info.context or {}).get("recipe"):
        return
    sentences, refused = [], []
    for rule in rules:
        keys = [f"{prefix}{k}" for key in rule.keys if rule.inert for k in written(model, key)]
        keys = [k for k in keys if k not in refused]
        if not keys:
            continue
        one = len(keys) == 1
        names = keys[0] if one else ", ".join(keys[:-1]) + " and " + keys[-1]
        sentences.append(
            f"{names} {'acts' if one else 'act'} only {rule.when}; remove {'it' if one else 'them'} or {rule.fix}."
        )
        refused += keys
    if sentences:
        raise PydanticCustomError(INERT_ERROR, "\n".join(sentences), {"keys": refused, "sentences": sentences})


class EmaConfig(Strict):
    decay: float = Field(0.999, gt=0, lt=1)


class TrainConfig(Strict):
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, description="Stops after this many optimiser steps if > 0 (overrides epochs).")
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        32,
        description="Per device. auto: the largest that fits in memory (probed when the run starts, halving from "
        "the data's size; written to config.yaml and summary.json).",
    )
    grad_accum: int = Field(1, gt=0)
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Samples per optimiser step over all processes; sets grad_accum to global_batch_size / "
        "(batch_size x processes), which must divide evenly (with batch_size: auto, the batch is chosen so it does).",
    )
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    optimizer: Literal["adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = Field(
        "adamw",
        description="adamw_8bit: AdamW with 8-bit moments (bitsandbytes, a quarter of AdamW's state); paged_*: "
        "bitsandbytes AdamW whose states page to CPU memory when the GPU runs short (GPU only).",
    )
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
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed config: a built-in name (zero2: optimizer states and gradients sharded; zero3: "
        "parameters too) or the path of a DeepSpeed JSON file; needs the deepspeed package.",
    )
    fsdp: Literal["full_shard", "shard_grad_op"] | None = Field(
        None,
        description="FSDP2 (PyTorch fully_shard through accelerate; on CPU with several ranks, --nproc 2): full_shard "
        "shards parameters, gradients and optimizer states and reshards parameters after each forward; shard_grad_op "
        "keeps them gathered until the backward.",
    )

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> TrainConfig:
        sgd = Inert(("momentum",), self.optimizer != "sgd", "with train.optimizer: sgd", "set train.optimizer: sgd")
        refuse_inert(self, info, [sgd], prefix="train.")
        return self

    @field_validator("batch_size", mode="wrap")
    @classmethod
    def _batch_size(cls, value: Any, handler: Any) -> Any:
        # one message, not one per member of the union
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be a whole number above 0 or auto") from None

    @model_validator(mode="after")
    def _one_accumulation(self, info: ValidationInfo) -> TrainConfig:
        # a recipe only: a run's config.yaml records both (grad_accum as the global batch set it)
        recipe = (info.context or {}).get("recipe")
        if recipe and self.global_batch_size is not None and written(self, "grad_accum"):
            raise ValueError(
                "train.grad_accum and train.global_batch_size both set the gradient accumulation; remove one"
            )
        return self

    @model_validator(mode="after")
    def _paged_needs_gpu(self) -> TrainConfig:
        # bitsandbytes falls back to the unpaged optimiser on CPU with only a warning: refuse it here instead
        if self.optimizer.startswith("paged") and not gpu_training(self.cpu):
            raise ValueError(
                f"train.optimizer: {self.optimizer} pages optimiser states out of GPU memory and this run trains on "
                "CPU; use adamw_8bit or adamw"
            )
        return self

    @model_validator(mode="after")
    def _one_sharding(self) -> TrainConfig:
        if self.fsdp and self.deepspeed:
            raise ValueError("train.fsdp and train.deepspeed both shard the model; keep one")
        # transformers refuses bf16/fp16 on a machine without GPUs unless use_cpu, and use_cpu turns DeepSpeed off
        if self.deepspeed and self.precision != "fp32" and not gpu_training(self.cpu):
            raise ValueError(
                f"train.precision: {self.precision} with train.deepspeed needs GPUs (transformers allows "
                f"{self.precision} on CPU only without DeepSpeed); set train.precision: fp32 for DeepSpeed on CPU"
            )
        return self

    @model_validator(mode="after")
    def _deepspeed_exists(self) -> TrainConfig:
        # refused when the recipe is read, not when the ranks have started and the run folder exists
        if self.deepspeed and not deepspeed_file(self.deepspeed).is_file():
            raise ValueError(
                f"train.deepspeed: {self.deepspeed} is neither a built-in DeepSpeed config ({', '.join(DEEPSPEED)}) "
                "nor a file; give one of those names or the path of a DeepSpeed JSON config"
            )
        return self


def gpu_training(cpu: bool | None) -> bool:
    """Whether a run with `train.cpu` = `cpu` trains on a GPU (the rule run/arguments.py applies)."""
    if cpu:
        return False
    import torch  # here, not at the top: reading a recipe without these keys imports no torch

    return torch.cuda.is_available()


class EmaTrainConfig(TrainConfig):
    """`train` for tasks that can keep an exponential moving average of the weights (the runner compares it with
    the trained weights on validation and keeps the better)."""

    ema: EmaConfig | None = None

    @model_validator(mode="after")
    def _ema_of_whole_weights(self) -> EmaTrainConfig:
        # seen on two ranks: timm's EMA averages whole tensors and FSDP2 hands it DTensor shards
        if self.ema is not None and self.fsdp:
            raise ValueError(
                "train.ema cannot average FSDP2 shards (timm's EMA needs the whole weights on every rank); remove "
                "train.ema or train.fsdp"
            )
        return self


class ClassifierTrainConfig(EmaTrainConfig):
    """`train` for tasks whose loss is a classifier's cross-entropy (classify, the CLIP classifier tasks)."""

    label_smoothing: float = Field(0.0, ge=0, lt=1)


class TrackConfig(Strict):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "visiontune"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> TrackConfig:
        wandb = Inert(
            ("wandb_project", "wandb_mode"), not self.wandb, "with track.wandb: true", "set track.wandb: true"
        )
        refuse_inert(self, info, [wandb], prefix="track.")
        return self


def no_validation_rule(data: Any, keys: tuple[str, ...]) -> Inert:
    """Keys that act only on validation (best checkpoint, early stopping, evaluation), where the schema lets a
    recipe have none: no `data.val` and `data.val_split: 0`."""
    none = data.val is None and data.val_split == 0
    return Inert(keys, none, "with validation data (data.val, or data.val_split above 0)", "give validation data")


def val_split_rule(data: Any) -> Inert:
    """`data.val_split` splits validation off `data.train` only when the recipe gives no `data.val`."""
    return Inert(("val_split",), data.val is not None, "without data.val (it splits data.train)", "remove data.val")
