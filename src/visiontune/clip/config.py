"""Typed recipes for the CLIP tasks: `clip_classify`, `clip_continual`, `clip_contrastive`.

FusionBench `clip_finetune` keys map onto these (see docs/fusionbench.md): learning_rate -> train.lr,
weight_decay -> train.weight_decay, num_steps -> train.max_steps, batch_size -> train.batch_size,
num_workers -> data.workers, save_interval -> train.eval_steps, state_dict_load_path -> init_from,
state_dict_save_path -> export_state_to, skip_training -> skip_training, use_lora / use_l_lora -> tune.method,
lora_config -> tune.lora.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from visiontune.classify.config import CLASSIFIER_METRICS, DataConfig
from visiontune.core.config import PIL_MAX_PIXELS, AugmentConfig, ImageAugmentConfig
from visiontune.run.config import (
    ClassifierTrainConfig,
    EmaTrainConfig,
    Inert,
    Strict,
    TrackConfig,
    refuse_inert,
    val_split_rule,
    zero_stage,
)


class ClipTrainConfig(ClassifierTrainConfig):
    """CLIP fine-tuning defaults (FusionBench's): small LR, no weight decay, no warmup. A recipe's own `train:`
    section starts from these, not from the image-classifier defaults."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)


class ContrastiveTrainConfig(EmaTrainConfig):
    # the batch is also the set of in-batch negatives, part of the loss: never chosen by memory (no `auto`)
    batch_size: int = Field(32, gt=0, description="Per device; also the number of in-batch negatives.")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    epochs: float = Field(1, gt=0)
    metric: str = "mean_recall"


class ClipLoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="Module names inside the vision tower."
    )


class ClipTuneConfig(Strict):
    method: Literal["full", "lora", "l_lora"] = "full"
    lora: ClipLoraConfig = ClipLoraConfig()

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> ClipTuneConfig:
        rules = [
            Inert(("lora",), self.method == "full", "with tune.method lora or l_lora", "set one of those methods"),
            # L-LoRA linearises the adapters around their initial values and trains without dropout (vision_lora.py).
            Inert(
                ("lora.dropout",),
                self.method == "l_lora",
                "with tune.method: lora (L-LoRA trains without dropout)",
                "set tune.method: lora",
            ),
        ]
        refuse_inert(self, info, rules, prefix="tune.")
        return self


def _check_templates(templates: list[str] | str) -> list[str] | str:
    if isinstance(templates, list):
        if not templates:
            raise ValueError("give at least one prompt template, or `builtin`")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"templates must contain exactly one `{{}}` for the class name: {bad}")
    return templates


def _check_names(names: list[str] | None) -> list[str] | None:
    if names is not None and (not names or len(set(names)) != len(names)):
        raise ValueError("class names must be non-empty and without duplicates")
    return names


class ClipDataConfig(DataConfig):
    templates: list[str] | Literal["builtin"] = Field("builtin", description="Prompt templates with one `{}`.")
    prompt_names: list[str] | None = Field(
        None, description="Readable class names for the prompts, in label order (default: the dataset's class names)."
    )

    _templates = field_validator("templates")(classmethod(lambda cls, v: _check_templates(v)))
    _prompt_names = field_validator("prompt_names")(classmethod(lambda cls, v: _check_names(v)))


class WiseFtConfig(Strict):
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    control: str | None = Field(None, description="Held-out labelled data whose zero-shot accuracy must survive.")
    choose: float | Literal["best_target", "best_mean"] = Field("best_mean", description="Mix written as a model.")

    @field_validator("alphas")
    @classmethod
    def _in_range(cls, alphas: list[float]) -> list[float]:
        if not alphas or any(not 0 <= a <= 1 for a in alphas):
            raise ValueError("wise_ft.alphas must be a non-empty list of numbers in [0, 1]")
        return sorted(set(alphas))


class ClipClassifyConfig(Strict):
    """Fine-tune a CLIP-family vision encoder behind a frozen zero-shot text head."""

    task: Literal["clip_classify"] = "clip_classify"
    model: str = Field(description="CLIP/SigLIP hub id or folder, a saved visiontune dual encoder, or builtin:NAME.")
    output_dir: str
    seed: int = 42
    data: ClipDataConfig
    tune: ClipTuneConfig = ClipTuneConfig()
    train: ClipTrainConfig = ClipTrainConfig()
    track: TrackConfig = TrackConfig()
    init_from: str | None = Field(None, description="Load vision weights (state dict file) before training.")
    export_state_to: str | None = Field(None, description="Also write the vision state dict to this file.")
    skip_training: bool = Field(False, description="Evaluate zero-shot only.")
    wise_ft: WiseFtConfig | None = None

    def validation_metrics(self) -> list[str]:
        return list(CLASSIFIER_METRICS)

    @model_validator(mode="after")
    def _wise_ft_needs_mergeable_weights(self, info: ValidationInfo) -> ClipClassifyConfig:
        if self.wise_ft is not None and self.tune.method == "l_lora":
            raise ValueError("wise_ft needs tune.method full or lora (L-LoRA weights are not a plain model)")
        if self.tune.method == "l_lora" and zero_stage(self.train.deepspeed) == 3:
            # seen on two CPU ranks: "You must implement the jvp function for custom autograd.Function"
            raise ValueError(
                "tune.method: l_lora cannot train under ZeRO-3: L-LoRA's forward-mode derivative (torch.func.jvp) "
                "runs through the autograd functions ZeRO-3 wraps module outputs in, and DeepSpeed (0.19.8) gives "
                "them no jvp; use train.deepspeed: zero2, or DDP (`--nproc N`)"
            )
        _ema_needs_full(self)
        # skip_training only scores the zero-shot head on the validation split (ClipClassifyTask.zero_shot_only).
        training = Inert(
            ("train", "tune", "track", "data.augment", "data.workers", "wise_ft", "export_state_to"),
            self.skip_training,
            "when the model trains",
            "set skip_training: false",
        )
        refuse_inert(self, info, [training])
        return self


class ContinualTask(Strict):
    name: str
    train: str
    val: str | None = None
    class_names: list[str] | None = Field(None, description="Fixes the task's label set and order.")
    prompt_names: list[str] | None = Field(None, description="Readable class names for the prompts.")

    _prompt_names = field_validator("prompt_names")(classmethod(lambda cls, v: _check_names(v)))


class ClipSharedData(Strict):
    """Settings shared by every task of a continual sequence."""

    templates: list[str] | Literal["builtin"] = "builtin"
    val_split: float = Field(0.2, gt=0, lt=1)
    image_size: int | None = Field(None, gt=0)
    augment: AugmentConfig = AugmentConfig(preset="none")
    workers: int | Literal["auto"] = "auto"
    on_bad_sample: Literal["error", "skip"] = "error"
    max_image_pixels: int = Field(PIL_MAX_PIXELS, gt=0)

    _templates = field_validator("templates")(classmethod(lambda cls, v: _check_templates(v)))


class ClipContinualConfig(Strict):
    """Fine-tune on a sequence of classification tasks; evaluate every task seen so far after each."""

    task: Literal["clip_continual"] = "clip_continual"
    model: str
    output_dir: str
    seed: int = 42
    tasks: list[ContinualTask]
    shuffle: bool = Field(False, description="Shuffle the task order with `seed`.")
    data: ClipSharedData = ClipSharedData()
    tune: ClipTuneConfig = ClipTuneConfig()
    train: ClipTrainConfig = ClipTrainConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        return list(CLASSIFIER_METRICS)

    @model_validator(mode="after")
    def _tasks(self, info: ValidationInfo) -> ClipContinualConfig:
        names = [t.name for t in self.tasks]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError("tasks must list at least two tasks with distinct names")
        _ema_needs_full(self)
        if zero_stage(self.train.deepspeed) == 3:
            # seen on two CPU ranks ("max_position_embeddings: 0"); ZeRO-2 trains it (test_continual_deepspeed.py)
            raise ValueError(
                "train.deepspeed: zero3 cannot train clip_continual: ZeRO-3 partitions the shared model's weights in "
                "place when the first task trains, and the next task's zero-shot head reads the text tower outside "
                "DeepSpeed's engine, where its weights are empty; use train.deepspeed: zero2, or DDP (`--nproc N`)"
            )
        if self.train.fsdp:
            # seen on two CPU ranks: after the first task the evaluation met DTensor shards and the task's checkpoint
            # an invalid storage
            raise ValueError(
                "train.fsdp cannot train clip_continual: FSDP2 shards the shared model in place when the first task "
                "trains (torch's fully_shard has no undo), and the evaluation and per-task checkpoint between tasks "
                "read its weights outside a forward; remove it and train with DDP (`--nproc N`), or run the tasks as "
                "clip_classify runs chained by init_from"
            )
        split = Inert(
            ("data.val_split",),
            all(t.val is not None for t in self.tasks),
            "for a task without its own val (every task here has one)",
            "drop val from a task",
        )
        refuse_inert(self, info, [split])
        return self


def _ema_needs_full(cfg: ClipClassifyConfig | ClipContinualConfig) -> None:
    if cfg.train.ema is not None and cfg.tune.method != "full":
        raise ValueError("train.ema is supported with tune.method=full only; remove one of them")


class CaptionDataConfig(Strict):
    train: str = Field(description="Image-caption pairs: .csv/.jsonl (image,caption), COCO captions JSON, dataset.")
    val: str | None = None
    val_split: float = Field(0.1, gt=0, lt=1)
    image_root: str | None = Field(None, description="Folder image paths are relative to (default: the file's).")
    image_size: int | None = Field(None, gt=0)
    augment: ImageAugmentConfig = ImageAugmentConfig(preset="none")
    workers: int | Literal["auto"] = "auto"
    on_bad_sample: Literal["error", "skip"] = "error"
    max_image_pixels: int = Field(PIL_MAX_PIXELS, gt=0)
    zero_shot: str | None = Field(None, description="Labelled data for zero-shot accuracy after training.")
    zero_shot_class_names: list[str] | None = None
    templates: list[str] | Literal["builtin"] = "builtin"

    _templates = field_validator("templates")(classmethod(lambda cls, v: _check_templates(v)))

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> CaptionDataConfig:
        zero_shot = Inert(
            ("zero_shot_class_names", "templates"),
            self.zero_shot is None,
            "with data.zero_shot (they name and prompt its classes)",
            "set data.zero_shot",
        )
        refuse_inert(self, info, [val_split_rule(self), zero_shot], prefix="data.")
        return self


# What clip_contrastive's validation reports: retrieval recall both ways (clip/retrieval.py) and the loss.
CONTRASTIVE_METRICS = ("mean_recall", "loss", *(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)))


class ClipContrastiveConfig(Strict):
    """Contrastive image-text fine-tuning (symmetric InfoNCE with the learnable temperature)."""

    task: Literal["clip_contrastive"] = "clip_contrastive"
    model: str
    output_dir: str
    seed: int = 42
    data: CaptionDataConfig
    trainable: Literal["both", "vision", "text", "projections"] = "both"
    train: ContrastiveTrainConfig = ContrastiveTrainConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        return list(CONTRASTIVE_METRICS)
