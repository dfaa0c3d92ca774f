"""Typed recipe for `task: vlm_assemble` — build a LLaVA-style VLM from a vision encoder, a projector and a causal
LM, then train it in two stages: `align` (only the projector learns, on captions) and `instruct` (projector + LM,
on conversations, starting from an `align` run)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from visiontune.run.config import (
    Inert,
    Strict,
    TrackConfig,
    no_validation_rule,
    refuse_inert,
    val_split_rule,
)
from visiontune.vlm.config import VALIDATION_KEYS, VlmEvalConfig, VlmTrainConfig, vlm_validation_metrics

# What assembles a new model; an instruct stage with `init_from` loads the align run's model as it was built.
ASSEMBLY_KEYS = ("vision", "language", "projector", "vision_layer", "drop_cls", "image_size")


class ProjectorConfig(Strict):
    kind: Literal["linear", "mlp2x_gelu", "moe", "patch_reducer"] = "mlp2x_gelu"
    options: dict[str, int | float] = Field(
        default_factory=dict,
        description="The kind's own arguments: moe {num_experts, top_k, hidden, balance_coef}; patch_reducer "
        "{num_tokens_out, depth, hidden} (num_patches_in is read off the vision encoder); hidden for mlp2x_gelu.",
    )


class AssembleDataConfig(Strict):
    train: str = Field(
        description="align: captions (LLaVA-Pretrain / COCO-captions JSON, CSV/JSONL image,caption, "
        "a saved dataset, builtin:mnist-5k-captions); instruct: conversations as in vlm_sft."
    )
    val: str | None = None
    val_split: float = Field(0.05, ge=0, lt=1)
    limit: int | None = Field(None, gt=0, description="Use only the first N training records (quick runs).")
    image_root: str | None = None
    dataset_name: str | None = Field(None, description="Entry of a LLaMA-Factory dataset_info.json (instruct).")
    train_on: Literal["assistant", "all"] = Field("assistant", description="Loss on answers/captions only, or all.")
    prompt: str = Field("Describe the image briefly.", description="align: the user turn put before each caption.")
    max_length: int = Field(512, gt=0)
    max_image_pixels: int = Field(512 * 512, gt=0)
    on_bad_sample: Literal["error", "skip"] = "error"
    group_by_length: bool = True
    packing: bool = Field(
        False,
        description="Each batch's records as one padding-free row, each with its own positions and attention that "
        "never crosses a record; the loss is unchanged.",
    )
    workers: int = Field(0, ge=0)
    cache: bool = True

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> AssembleDataConfig:
        refuse_inert(self, info, [val_split_rule(self)], prefix="data.")
        return self


class ScheduledSamplingConfig(Strict):
    """Feed the model its own previous prediction with probability 1 - ratio; costs a second forward per step."""

    schedule: Literal["linear", "exponential", "inverse_sigmoid"] = "inverse_sigmoid"
    start: float = Field(1.0, ge=0, le=1, description="Teacher-forcing ratio at step 0.")
    end: float = Field(0.5, ge=0, le=1, description="Teacher-forcing ratio at the last step.")
    k: float | None = Field(None, description="Schedule constant; None picks the documented default.")

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> ScheduledSamplingConfig:
        k = Inert(
            ("k",),
            self.schedule == "linear",
            "with scheduled_sampling.schedule exponential or inverse_sigmoid",
            "choose one of those schedules",
        )
        refuse_inert(self, info, [k], prefix="scheduled_sampling.")
        return self


class AssembleTuneConfig(Strict):
    language: Literal["frozen", "full", "lora"] = Field(
        "lora", description="instruct stage: how the LM trains (align always keeps it frozen)."
    )
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    train_projector: bool = True
    vision: Literal["frozen", "full"] = Field(
        "frozen",
        description="instruct stage: full trains the vision encoder too (its BatchNorm statistics stay as "
        "pretrained); the fix when frozen features cap accuracy (a linear probe on them shows the ceiling).",
    )
    vision_lr_scale: float = Field(1.0, gt=0, description="The vision encoder's LR as a multiple of train.lr.")


class AssembleTrainConfig(VlmTrainConfig):
    """vlm_sft's defaults, with a projector-sized LR and larger batches (align trains only the small projector)."""

    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, gt=0)


class VlmAssembleConfig(Strict):
    task: Literal["vlm_assemble"] = "vlm_assemble"
    stage: Literal["align", "instruct"] = Field(description="align: projector only; instruct: projector + LM.")
    vision: str | None = Field(None, description="CLIP/SigLIP hub id or folder, timm:NAME, builtin:efficientnet-lite0.")
    language: str | None = Field(None, description="Causal-LM hub id or folder, or builtin:smollm2-135m-instruct.")
    init_from: str | None = Field(None, description="instruct: the align run folder (or its model/) to start from.")
    projector: ProjectorConfig = ProjectorConfig()
    vision_layer: int = Field(-1, description="Hidden state the features come from (-1 last, -2 as LLaVA).")
    drop_cls: bool = Field(True, description="Drop the CLS / prefix tokens of a ViT encoder.")
    image_size: int | None = Field(None, gt=0, description="Input edge; the encoder's pretrained size if unset.")
    chat_template: str | None = Field(None, description="Jinja chat template when the LM's tokenizer has none.")
    output_dir: str
    seed: int = 42
    data: AssembleDataConfig
    tune: AssembleTuneConfig = AssembleTuneConfig()
    scheduled_sampling: ScheduledSamplingConfig | None = None
    train: AssembleTrainConfig = AssembleTrainConfig()
    eval: VlmEvalConfig = VlmEvalConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        return vlm_validation_metrics(self.eval)

    @model_validator(mode="after")
    def _sources(self, info: ValidationInfo) -> VlmAssembleConfig:
        align = self.stage == "align"
        # What each stage reads (assemble.py): align trains the projector alone, on captions under `data.prompt`;
        # instruct loads `init_from` as saved and tunes the LM as `tune` says.
        rules = [
            Inert(
                ("tune", "init_from"),
                align,
                "with stage: instruct (align trains the projector alone)",
                "set stage: instruct",
            ),
            Inert(
                ("tune.lora_r", "tune.lora_alpha", "tune.lora_dropout"),
                not align and self.tune.language != "lora",
                "with tune.language: lora",
                "set tune.language: lora",
            ),
            Inert(
                ("tune.vision_lr_scale",),
                not align and self.tune.vision == "frozen",
                "with tune.vision: full",
                "set tune.vision: full",
            ),
            Inert(
                ("data.prompt",), not align, "with stage: align (the user turn before each caption)", "set stage: align"
            ),
            Inert(
                ASSEMBLY_KEYS,
                not align and self.init_from is not None,
                "when a model is assembled (stage align, or instruct without init_from, which loads the align run)",
                "remove init_from",
            ),
            no_validation_rule(self.data, VALIDATION_KEYS),
        ]
        refuse_inert(self, info, rules)
        if align and not (self.vision and self.language):
            raise ValueError("stage align builds a new model: set both `vision` and `language`")
        if self.stage == "instruct" and not self.init_from and not (self.vision and self.language):
            raise ValueError("stage instruct needs `init_from` (an align run) or both `vision` and `language`")
        if self.scheduled_sampling and self.scheduled_sampling.end > self.scheduled_sampling.start:
            raise ValueError("scheduled_sampling.end must not exceed scheduled_sampling.start")
        return self
