"""The task registry: one entry per task, holding everything task-specific that lives outside the task's folder.

Adding a task means one family folder plus one `TaskSpec` here: the recipe loader finds its config, the runner its
implementation, the report its labels, `visiontune fixtures` its smoke run. The entries are import strings, resolved
on first use, so `visiontune --help` never imports torch (the idea of Ultralytics' task map).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReportLabels:
    """How report.md names what the task measured."""

    before: str = "before"  # header of the column measured before training
    before_means: str = "before training"  # ends "Validation metrics ... and after training."
    metrics: dict[str, str] = field(default_factory=dict)  # metric key -> its name in the report


@dataclass(frozen=True)
class Smoke:
    """How `visiontune fixtures` runs the task's built-in recipes for two steps on the tiny fixtures."""

    model: str  # fixture kind for the `model:` key (testing/fixtures.py:MODEL_FIXTURES); "" if the task has none
    data: str  # fixture for `data.train` (testing/fixtures.py:DATA_FIXTURES)
    data_by_stage: dict[str, str] = field(default_factory=dict)  # a recipe's `stage:` -> its data fixture
    overrides: tuple[str, ...] = ()  # always added (small evaluation, small data)


@dataclass(frozen=True)
class TaskSpec:
    config: str  # "module:Class" of the task's pydantic config (`task: Literal[name]`)
    task: str  # "module:Class" of its `run.task.Task` subclass
    smoke: Smoke
    report: ReportLabels = ReportLabels()

    def config_class(self) -> Any:
        return _load(self.config)

    def create(self) -> Any:
        return _load(self.task)()


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_CLASSIFIER_LOSS = {"loss": "cross-entropy (no label smoothing)"}  # the logged eval_loss adds label smoothing
_VLM_SMOKE = ("eval.max_samples=2", "eval.max_new_tokens=2")

TASKS: dict[str, TaskSpec] = {
    "classify": TaskSpec(
        config="visiontune.classify.config:ClassifyConfig",
        task="visiontune.classify.task:ClassifyTask",
        smoke=Smoke(model="image_classifier", data="images"),
        report=ReportLabels("before", "before training (pretrained backbone, new head)", _CLASSIFIER_LOSS),
    ),
    "clip_classify": TaskSpec(
        config="visiontune.clip.config:ClipClassifyConfig",
        task="visiontune.clip.classify:ClipClassifyTask",
        smoke=Smoke(model="dual_encoder", data="images", overrides=("data.image_size=32",)),
        report=ReportLabels(
            "zero-shot",
            "of the pretrained encoder with its zero-shot text head (before training)",
            {**_CLASSIFIER_LOSS, "accuracy": "accuracy (zero-shot before)"},
        ),
    ),
    "clip_continual": TaskSpec(
        config="visiontune.clip.config:ClipContinualConfig",
        task="visiontune.clip.continual:ClipContinualTask",
        smoke=Smoke(model="dual_encoder", data="images", overrides=("data.image_size=32",)),
        report=ReportLabels(
            "zero-shot", "on every task of the sequence, zero-shot (before training)", _CLASSIFIER_LOSS
        ),
    ),
    "clip_contrastive": TaskSpec(
        config="visiontune.clip.config:ClipContrastiveConfig",
        task="visiontune.clip.contrastive:ClipContrastiveTask",
        smoke=Smoke(model="dual_encoder", data="captions", overrides=("data.image_size=32",)),
        report=ReportLabels("before", "of the pretrained dual encoder (before training)"),
    ),
    "detect": TaskSpec(
        config="visiontune.detect.config:DetectConfig",
        task="visiontune.detect.task:DetectTask",
        smoke=Smoke(
            model="detector",
            data="boxes",
            overrides=(
                "data.image_size=64",
                "data.train=builtin:mnist-detect:64",
                "data.val=builtin:mnist-detect-heldout:16",
            ),
        ),
        report=ReportLabels(
            "before",
            "(COCO box metrics) of the detector with its new, untrained head (before training)",
            {
                "map": "mAP@[.5:.95]",
                "map_50": "mAP@.5",
                "map_75": "mAP@.75",
                "map_small": "mAP small",
                "map_medium": "mAP medium",
                "map_large": "mAP large",
                "mar_100": "AR@100",
                "mask_map": "mask mAP@[.5:.95]",
                "mask_map_50": "mask mAP@.5",
                "mask_map_75": "mask mAP@.75",
            },
        ),
    ),
    "segment": TaskSpec(
        config="visiontune.segment.config:SegmentConfig",
        task="visiontune.segment.task:SegmentTask",
        smoke=Smoke(
            model="segmenter",
            data="masks",
            overrides=(
                "data.image_size=64",
                "data.train=builtin:mnist-segment:64",
                "data.val=builtin:mnist-segment-heldout:16",
            ),
        ),
        report=ReportLabels(
            "before",
            "(over every labelled pixel, at each image's own size) of the segmenter with its new, untrained head "
            "(before training)",
            {
                "miou": "mIoU",
                "pixel_accuracy": "pixel accuracy",
                "mean_dice": "mean Dice",
                "loss": "cross-entropy (per labelled pixel)",
            },
        ),
    ),
    "vlm_sft": TaskSpec(
        config="visiontune.vlm.config:VlmSftConfig",
        task="visiontune.vlm.sft:VlmSftTask",
        smoke=Smoke(model="vlm", data="conversations", overrides=_VLM_SMOKE),
        report=ReportLabels("before", "of the base model (before training)"),
    ),
    "vlm_preference": TaskSpec(
        config="visiontune.vlm.preference_config:VlmPreferenceConfig",
        task="visiontune.vlm.preference:VlmPreferenceTask",
        smoke=Smoke(model="vlm", data="preferences", overrides=_VLM_SMOKE),
        report=ReportLabels("before", "of the starting model (before preference tuning)"),
    ),
    "vlm_assemble": TaskSpec(
        config="visiontune.vlm.assemble_config:VlmAssembleConfig",
        task="visiontune.vlm.assemble:VlmAssembleTask",
        smoke=Smoke(
            model="",
            data="captions",
            data_by_stage={"instruct": "conversations"},
            overrides=(*_VLM_SMOKE, "data.limit=16"),
        ),
        report=ReportLabels("before", "of the assembled model before this stage's training"),
    ),
}
