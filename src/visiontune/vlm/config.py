"""Typed recipe for `task: vlm_sft` — supervised fine-tuning of a vision-language model (SmolVLM / Idefics3,
Qwen2-VL, Qwen2.5-VL, LLaVA). Key names follow LLaMA-Factory where users know them (noted per field)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from visiontune.run.config import (
    Inert,
    Strict,
    TrackConfig,
    TrainConfig,
    gpu_training,
    no_validation_rule,
    refuse_inert,
    val_split_rule,
)

# Keys that act only through validation: the best checkpoint, early stopping and the generation evaluation.
VALIDATION_KEYS = ("train.metric", "train.early_stopping_patience", "eval")


class VlmTrainConfig(TrainConfig):
    """SFT defaults (LoRA-sized LR, loss as the model-selection metric)."""

    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1, gt=0)
    batch_size: int = Field(4, gt=0)
    metric: str = "loss"
    grad_checkpointing_offload: bool = Field(
        False,
        description="With train.grad_checkpointing: keep the activations saved for the recompute in CPU memory, not "
        "GPU memory (transformers' activation checkpointing offload; GPU only).",
    )

    @model_validator(mode="after")
    def _offload(self, info: ValidationInfo) -> VlmTrainConfig:
        rule = Inert(
            ("grad_checkpointing_offload",),
            not self.grad_checkpointing,
            "with train.grad_checkpointing: true",
            "set train.grad_checkpointing: true",
        )
        refuse_inert(self, info, [rule], prefix="train.")
        if self.grad_checkpointing and self.grad_checkpointing_offload and not gpu_training(self.cpu):
            raise ValueError(
                "train.grad_checkpointing_offload moves saved activations from GPU to CPU memory and this run trains "
                "on CPU, where they already are; remove it"
            )
        return self


class VlmDataConfig(Strict):
    train: str = Field(description="JSON/JSONL (ShareGPT, LLaVA or messages style), dataset_info.json, or dataset.")
    val: str | None = None
    val_split: float = Field(0.1, ge=0, lt=1, description="LLaMA-Factory `val_size`.")
    dataset_name: str | None = Field(None, description="Entry of a LLaMA-Factory dataset_info.json.")
    image_root: str | None = Field(None, description="Folder relative image paths start from.")
    max_length: int = Field(2048, gt=0, description="LLaMA-Factory `cutoff_len`: tokens per record, images included.")
    max_image_pixels: int = Field(
        512 * 512,
        gt=0,
        description="LLaMA-Factory `image_max_pixels`: images above "
        "are downscaled (keeps aspect) before the processor.",
    )
    on_bad_sample: Literal["error", "skip"] = "error"
    train_on: Literal["assistant", "all"] = Field("assistant", description="Loss on assistant turns only, or all.")
    group_by_length: bool = Field(True, description="Batch records of similar length to cut padding.")
    packing: bool = Field(
        False,
        description="Each batch's records as one padding-free row, each with its own positions (3-D for "
        "Qwen2-VL) and attention that never crosses a record; the loss is unchanged.",
    )
    workers: int = Field(0, ge=0)
    cache: bool = Field(True, description="Cache tokenised records so a re-run does not re-tokenise.")

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> VlmDataConfig:
        refuse_inert(self, info, [val_split_rule(self)], prefix="data.")
        return self


class VlmTuneConfig(Strict):
    method: Literal["full", "lora", "qlora"] = Field("lora", description="LLaMA-Factory `finetuning_type`.")
    lora_r: int = Field(16, gt=0, description="LLaMA-Factory `lora_rank`.")
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target: list[str] | Literal["all"] = Field("all", description="`all`: every Linear of the language model.")
    train_vision: bool = False
    train_projector: bool = True
    train_language: bool = True
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="dtype the weights load in (transformers `dtype`); auto: the checkpoint's saved dtype. bf16/fp16 "
        "halve the weights' memory; training then updates them in that dtype (train.precision sets the compute).",
    )
    qlora_bits: Literal[4, 8] = Field(
        4, description="tune.method qlora: the language model's Linear layers load in 4-bit nf4 or 8-bit (LLM.int8)."
    )

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> VlmTuneConfig:
        full = self.method == "full"
        rules = [
            Inert(
                ("lora_r", "lora_alpha", "lora_dropout", "lora_target"),
                full,
                "with tune.method lora or qlora",
                "set one of those methods",
            ),
            Inert(
                ("train_language",),
                not full,
                "with tune.method: full (LoRA and QLoRA always adapt the language model)",
                "set tune.method: full",
            ),
            Inert(("qlora_bits",), self.method != "qlora", "with tune.method: qlora", "set tune.method: qlora"),
            # PEFT's prepare_model_for_kbit_training casts every unquantised weight to fp32 for a stable QLoRA
            Inert(
                ("dtype",),
                self.method == "qlora",
                "with tune.method full or lora (QLoRA keeps its unquantised weights in fp32)",
                "set one of those methods",
            ),
        ]
        refuse_inert(self, info, rules, prefix="tune.")
        if full and self.dtype == "fp16":
            # AdamW updates the fp16 weights themselves, with no loss scaling: a fixture's loss was NaN at step 2
            raise ValueError(
                "tune.dtype: fp16 with tune.method: full trains fp16 weights with no loss scaling and overflows; "
                "use tune.dtype: bf16, or tune.method lora (its adapters train in fp32)"
            )
        return self


class VlmEvalConfig(Strict):
    metrics: list[str] = Field(default_factory=lambda: ["exact_match"])
    max_new_tokens: int = Field(64, gt=0)
    max_samples: int | None = Field(None, gt=0, description="Before/after training: at most this many val records.")
    samples_during_training: int = Field(
        8, ge=0, description="Val records answered at each validation during training (0: loss only)."
    )


def generation_metric_keys(names: list[str]) -> list[str]:
    """The keys the generation metrics `names` report (vlm/generation_metrics.py: "json" reports four)."""
    json_keys = ["json_valid_rate", "json_field_precision", "json_field_recall", "json_field_f1"]
    return [key for name in names for key in (json_keys if name == "json" else [name])]


def vlm_validation_metrics(ev: VlmEvalConfig) -> list[str]:
    """Validation during training: the loss, plus the generation metrics when it answers some records."""
    return ["loss", *(generation_metric_keys(ev.metrics) if ev.samples_during_training else [])]


class VlmSftConfig(Strict):
    task: Literal["vlm_sft"] = "vlm_sft"
    model: str = Field(description="LLaMA-Factory `model_name_or_path`: hub id or folder.")
    output_dir: str
    seed: int = 42
    chat_template: str | None = Field(None, description="Jinja template when the processor has none.")
    data: VlmDataConfig
    tune: VlmTuneConfig = VlmTuneConfig()
    train: VlmTrainConfig = VlmTrainConfig()
    eval: VlmEvalConfig = VlmEvalConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        return vlm_validation_metrics(self.eval)

    @model_validator(mode="after")
    def _something_trains(self, info: ValidationInfo) -> VlmSftConfig:
        check_something_trains(self, info)
        return self


def check_something_trains(cfg: Any, info: ValidationInfo) -> None:
    """Shared by the VLM tasks that train a family model (vlm_sft, vlm_preference): validation keys without validation
    data are refused, and the tune switches must leave something for the method to train."""
    refuse_inert(cfg, info, [no_validation_rule(cfg.data, VALIDATION_KEYS)])
    t = cfg.tune
    if not (t.train_vision or t.train_projector or t.train_language):
        raise ValueError("tune.train_vision, train_projector and train_language are all false: nothing trains")
    if t.method != "full" and not t.train_language:
        raise ValueError(
            f"tune.train_language=false with tune.method={t.method}: LoRA adapts the language model; use "
            "tune.method=full to train only the vision tower or projector"
        )
