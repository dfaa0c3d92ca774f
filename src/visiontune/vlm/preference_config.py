"""Typed recipe for `task: vlm_preference` — preference tuning (DPO and its variants) of a vision-language model on
pairs of answers to the same prompt and image(s). Loss key names follow TRL's `DPOConfig` (`beta`,
`label_smoothing`, `rpo_alpha`, `loss_type`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from visiontune.run.config import Inert, Strict, TrackConfig, refuse_inert, val_split_rule
from visiontune.vlm.config import (
    VlmEvalConfig,
    VlmTrainConfig,
    VlmTuneConfig,
    check_something_trains,
    generation_metric_keys,
)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
# What validation reports besides the generation metrics: TRL's names, so dashboards read the same.
REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


class PreferenceTrainConfig(VlmTrainConfig):
    """DPO's usual LoRA-sized defaults: a smaller step than SFT (the reference anchors the start)."""

    lr: float = Field(5e-5, gt=0)


class PreferenceDataConfig(Strict):
    train: str = Field(
        description="Preference pairs: TRL prompt/chosen/rejected JSONL, a LLaMA-Factory dataset_info.json with "
        "`ranking: true` (or its folder), or JSONL conversations with chosen/rejected answers."
    )
    val: str | None = None
    val_split: float = Field(0.1, ge=0, lt=1, description="LLaMA-Factory `val_size`.")
    dataset_name: str | None = Field(None, description="Entry of a LLaMA-Factory dataset_info.json.")
    image_root: str | None = Field(None, description="Folder relative image paths start from.")
    max_length: int = Field(2048, gt=0, description="LLaMA-Factory `cutoff_len`: tokens per answer, images included.")
    max_image_pixels: int = Field(512 * 512, gt=0, description="LLaMA-Factory `image_max_pixels`.")
    on_bad_sample: Literal["error", "skip"] = "error"
    packing: bool = Field(
        False,
        description="Each batch's answers (chosen, then rejected) as one padding-free row, each record with its own "
        "positions and attention that never crosses a record; the pair loss is unchanged.",
    )
    workers: int = Field(0, ge=0)
    cache: bool = Field(
        True, description="Cache tokenised pairs (and, for full tuning, the reference log-probabilities)."
    )

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> PreferenceDataConfig:
        refuse_inert(self, info, [val_split_rule(self)], prefix="data.")
        return self


class PreferenceLossConfig(Strict):
    type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = Field(
        "sigmoid",
        description="TRL `loss_type`: DPO (sigmoid), IPO, hinge, robust DPO; or, with no reference model, SimPO or "
        "ORPO (odds-ratio term plus the NLL of the chosen answer).",
    )
    beta: float = Field(
        0.1, gt=0, description="TRL `beta`: how far from the reference the policy may move (ORPO: the odds weight)."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="TRL `label_smoothing`: share of flipped labels.")
    rpo_alpha: float | None = Field(None, gt=0, description="Weight of an SFT term on the chosen answer (RPO).")
    simpo_gamma: float = Field(0.5, ge=0, description="TRL CPO `simpo_gamma`: SimPO's target reward margin.")

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> PreferenceLossConfig:
        rules = [
            Inert(
                ("label_smoothing",),
                self.type not in ("robust", "simpo"),
                "with loss.type robust or simpo (TRL's other losses ignore it)",
                "set one of those types",
            ),
            Inert(("simpo_gamma",), self.type != "simpo", "with loss.type: simpo", "set loss.type: simpo"),
            Inert(
                ("rpo_alpha",),
                self.type == "orpo",
                "with the losses other than orpo (ORPO's loss already holds the NLL of the chosen answer)",
                "choose another loss.type",
            ),
        ]
        refuse_inert(self, info, rules, prefix="loss.")
        return self


class VlmPreferenceConfig(Strict):
    task: Literal["vlm_preference"] = "vlm_preference"
    model: str | None = Field(
        None, description="The VLM to tune (hub id or folder; often an SFT run's merged model). Or init_from."
    )
    init_from: str | None = Field(
        None, description="A vlm_assemble run (or its model/ folder) to tune instead of `model`: the assembled VLM."
    )
    output_dir: str
    seed: int = 42
    chat_template: str | None = Field(None, description="Jinja template when the processor has none.")
    data: PreferenceDataConfig
    loss: PreferenceLossConfig = PreferenceLossConfig()
    tune: VlmTuneConfig = VlmTuneConfig()
    train: PreferenceTrainConfig = PreferenceTrainConfig()
    eval: VlmEvalConfig = VlmEvalConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        generation = generation_metric_keys(self.eval.metrics) if self.eval.samples_during_training else []
        return ["loss", *REWARD_METRICS, *generation]

    @model_validator(mode="after")
    def _something_trains(self, info: ValidationInfo) -> VlmPreferenceConfig:
        if (self.model is None) == (self.init_from is None):
            raise ValueError(
                "set exactly one of `model` (a transformers VLM) and `init_from` (a vlm_assemble run to tune)"
            )
        check_something_trains(self, info)
        if self.init_from is not None:
            refuse_assembled_tuning(self.tune, info)
        return self

    def model_name(self) -> str:
        """What the tokenisation and reference caches key on: the hub id / folder, or the assembled run."""
        return self.model or f"assembled:{self.init_from}"


def refuse_assembled_tuning(tune: VlmTuneConfig, info: ValidationInfo) -> None:
    """The assembled model loads in fp32 and has no quantised loading path (vlm_assemble's own format)."""
    rules = [
        Inert(
            ("dtype",),
            True,
            "with `model` (an assembled VLM from init_from loads in fp32)",
            "tune a transformers VLM through `model`",
        )
    ]
    refuse_inert(tune, info, rules, prefix="tune.")
    if tune.method == "qlora":
        raise ValueError(
            "tune.method: qlora needs a transformers VLM (`model`); an assembled VLM (init_from) takes lora or full"
        )
