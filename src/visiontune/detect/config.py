"""Typed recipe for `task: detect`; unknown keys are errors (`extra="forbid"`). No torch here (`visiontune
validate` stays fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from visiontune.classify.config import MethodTuneConfig
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.run.config import EmaTrainConfig, Inert, Strict, TrackConfig, refuse_inert, val_split_rule

DETECTORS = ("fcos", "retinanet", "faster_rcnn", "ssdlite", "maskrcnn")  # torchvision, on a builtin:/timm: backbone
MASK_DETECTORS = ("maskrcnn",)  # detectors that also segment each object (instance masks, trained from COCO shapes)
# What the validation of a detector reports (detect/metrics.py): COCO box metrics; -1 where a size has no objects.
DETECTION_METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
MASK_METRICS = ("mask_map", "mask_map_50", "mask_map_75")  # COCO mask (segm) metrics of an instance segmenter
BACKBONE_PREFIXES = ("builtin:", "timm:")  # model sources that are backbones under `detector`, not detectors


def is_backbone(model: str) -> bool:
    return model.startswith(BACKBONE_PREFIXES)


def segments_masks(model: str, detector: str) -> bool:
    """Whether the recipe's model predicts instance masks: a backbone under `detector: maskrcnn`, or a saved
    visiontune Mask R-CNN (a run folder or its model/; read from its visiontune.json, no torch)."""
    if is_backbone(model):
        return detector in MASK_DETECTORS
    where = Path(model).expanduser()
    for folder in (where, where / "model"):
        try:
            manifest = json.loads((folder / "visiontune.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return isinstance(manifest, dict) and manifest.get("detector") in MASK_DETECTORS
    return False


class PresetAugmentConfig(Strict):
    """`data.augment` shared by detect and segment: a preset of geometric + colour steps that move the labels with the
    pixels, and the flip probability."""

    preset: Literal["none", "light", "strong"] = "light"
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal-flip probability (0 for digits, text, ...).")

    @model_validator(mode="after")
    def _inert_flip(self, info: ValidationInfo) -> PresetAugmentConfig:
        none = Inert(
            ("hflip",),
            self.preset == "none",
            "with data.augment.preset light or strong (preset none does not augment)",
            "choose one of those presets",
        )
        refuse_inert(self, info, [none], prefix="data.augment.")
        return self


class DetectAugmentConfig(PresetAugmentConfig):
    mosaic: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that a training image is a mosaic of four (YOLOv4 / Ultralytics), boxes and masks "
        "moved with their pixels.",
    )
    mosaic_off_epochs: int = Field(
        0, ge=0, description="Mosaic is off for the last N epochs (Ultralytics' close_mosaic), plain images to end on."
    )

    @model_validator(mode="after")
    def _inert_mosaic(self, info: ValidationInfo) -> DetectAugmentConfig:
        none = Inert(
            ("mosaic", "mosaic_off_epochs"),
            self.preset == "none",
            "with data.augment.preset light or strong (preset none does not augment)",
            "choose one of those presets",
        )
        closing = Inert(
            ("mosaic_off_epochs",), self.mosaic == 0, "with data.augment.mosaic above 0", "set data.augment.mosaic"
        )
        refuse_inert(self, info, [none, closing], prefix="data.augment.")
        return self


class DetectDataConfig(Strict):
    train: str = Field(
        description="COCO .json, YOLO data.yaml (or its folder), Pascal VOC folder, saved `datasets` folder with an "
        "`objects` column, or builtin:mnist-detect; detector maskrcnn: COCO with `segmentation` polygons / RLE."
    )
    val: str | None = None
    val_split: float = Field(0.1, gt=0, lt=1, description="Held-out fraction of train images when `val` is not given.")
    class_names: list[str] | None = Field(None, description="Fixes the classes and their order; others are errors.")
    image_size: int | None = Field(
        None,
        gt=0,
        description="Longest image side the detector sees; default 512 (torchvision detectors) or the "
        "checkpoint's image processor size (transformers).",
    )
    augment: DetectAugmentConfig = DetectAugmentConfig()
    workers: int | Literal["auto"] = Field("auto", description="DataLoader workers; auto: up to 4 by CPU count.")
    on_bad_sample: Literal["error", "skip"] = "error"
    max_image_pixels: int = Field(PIL_MAX_PIXELS, gt=0, description="Decompression-bomb guard (PIL's default).")

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> DetectDataConfig:
        refuse_inert(self, info, [val_split_rule(self)], prefix="data.")
        return self


class DetectTuneConfig(MethodTuneConfig):
    method: Literal["full", "linear_probe", "gradual_unfreeze", "lora"] = Field(
        "full", description="linear_probe: only the detection head trains; lora: transformers detectors only."
    )
    freeze_backbone: bool = Field(False, description="method full: the backbone stays frozen, neck and head train.")

    def extra_rules(self) -> list[Inert]:
        return [
            Inert(
                ("freeze_backbone",),
                self.method != "full",
                "with tune.method: full (the other methods choose what trains themselves)",
                "set tune.method: full",
            )
        ]


class DetectTrainConfig(EmaTrainConfig):
    """`train` with detection defaults: AdamW at 1e-3 killed FCOS's box regression on EfficientNet-Lite0 (every box a
    point) while 1e-4 fitted; the best checkpoint is chosen by COCO mAP."""

    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, gt=0, description="Per device.")
    epochs: float = Field(12, gt=0)
    metric: str = Field("map", description="Validation metric that selects the best checkpoint.")


class DetectEvalConfig(Strict):
    conf: float = Field(
        0.05, ge=0, lt=1, description="Score threshold of the detections evaluated (mAP also counts weak ones)."
    )
    iou: float | None = Field(
        None, gt=0, le=1, description="NMS IoU threshold; default: the detector's own (none for DETR-style models)."
    )
    max_detections: int = Field(100, gt=0, description="Detections kept per image.")


class DetectConfig(Strict):
    """Recipe for `task: detect` — fine-tune an object detector."""

    task: Literal["detect"] = "detect"
    model: str = Field(
        description="A backbone (builtin:efficientnet-lite0, timm:NAME, timm:local-dir:PATH) under `detector`, or a "
        "transformers object-detection checkpoint (hub id or folder: DETR, RT-DETR, YOLOS, ...), or a detect run."
    )
    detector: Literal["fcos", "retinanet", "faster_rcnn", "ssdlite", "maskrcnn"] = Field(
        "fcos",
        description="torchvision detector built on a builtin:/timm: backbone through an FPN; maskrcnn also predicts "
        "each object's mask (instance segmentation).",
    )
    fpn_channels: int = Field(
        64, gt=0, multiple_of=32, description="Width of the FPN (its heads' GroupNorm takes multiples of 32)."
    )
    output_dir: str
    seed: int = 42
    data: DetectDataConfig
    tune: DetectTuneConfig = DetectTuneConfig()
    train: DetectTrainConfig = DetectTrainConfig()
    eval: DetectEvalConfig = DetectEvalConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        masks = MASK_METRICS if segments_masks(self.model, self.detector) else ()
        return [*DETECTION_METRICS, *masks]

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> DetectConfig:
        backbone = is_backbone(self.model)
        if self.train.ema is not None and self.tune.method == "lora":
            raise ValueError("train.ema is not supported with tune.method=lora; remove one of them")
        if backbone and self.tune.method == "lora":
            raise ValueError(
                "tune.method lora applies to transformers detectors (attention layers); a builtin:/timm: backbone "
                "under a torchvision detector trains with full, linear_probe or gradual_unfreeze"
            )
        rule = Inert(
            ("detector", "fpn_channels"),
            not backbone,
            "with a builtin:/timm: backbone (a transformers checkpoint or a saved detector brings its own head)",
            "give model: builtin:NAME or timm:NAME",
        )
        refuse_inert(self, info, [rule])
        return self
