"""Typed recipe for `task: segment` (semantic segmentation); unknown keys are errors (`extra="forbid"`). No torch
here (`visiontune validate` stays fast)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from visiontune.classify.config import MethodTuneConfig
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.detect.config import PresetAugmentConfig, is_backbone
from visiontune.run.config import EmaTrainConfig, Inert, Strict, TrackConfig, refuse_inert, val_split_rule

# What the validation of a segmenter reports (segment/metrics.py), over every pixel but the ignored ones.
SEGMENTATION_METRICS = ("miou", "pixel_accuracy", "mean_dice", "loss")
DECODERS = ("fpn", "unet")  # decoders built on a builtin:/timm: backbone (segment/decoders.py)


class SegmentAugmentConfig(PresetAugmentConfig):
    """Mask-aware presets (segment/transforms.py): light = random resized crop + flip + colour jitter, strong = scale
    jitter + crop + flip + stronger jitter; the mask follows every geometric step (nearest), never the colour."""


class SegmentDataConfig(Strict):
    train: str = Field(
        description="Folder with images/ + masks/ (same names), Pascal VOC folder (SegmentationClass), COCO .json "
        "(polygons / RLE), saved `datasets` folder with an image and an annotation-image column, or "
        "builtin:mnist-segment."
    )
    val: str | None = None
    val_split: float = Field(0.1, gt=0, lt=1, description="Held-out fraction of train images when `val` is not given.")
    class_names: list[str] | None = Field(None, description="Fixes the classes and their order (class id = index).")
    palette: dict[str, list[int]] | None = Field(
        None, description="RGB masks: {class name: [r, g, b]} (a name `ignore` marks the ignored colour)."
    )
    ignore_index: int = Field(255, ge=0, description="Mask value counted in neither the loss nor the metrics.")
    reduce_labels: bool = Field(
        False, description="Label id 0 is ignored and id k is class k-1 (ADE20K / scene_parse_150 masks)."
    )
    image_size: int | None = Field(
        None,
        gt=0,
        description="Side of the square the model trains on; default 512 (builtin:/timm: backbones) or the "
        "checkpoint's image processor size (transformers).",
    )
    augment: SegmentAugmentConfig = SegmentAugmentConfig()
    workers: int | Literal["auto"] = Field("auto", description="DataLoader workers; auto: up to 4 by CPU count.")
    on_bad_sample: Literal["error", "skip"] = "error"
    max_image_pixels: int = Field(PIL_MAX_PIXELS, gt=0, description="Decompression-bomb guard (PIL's default).")

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> SegmentDataConfig:
        ids = Inert(
            ("reduce_labels",),
            self.palette is not None,
            "with label-id masks (an RGB data.palette names each colour's class itself)",
            "remove data.palette",
        )
        refuse_inert(self, info, [val_split_rule(self), ids], prefix="data.")
        return self


class SegmentTuneConfig(MethodTuneConfig):
    method: Literal["full", "linear_probe", "gradual_unfreeze", "lora"] = Field(
        "full",
        description="linear_probe: the decoder trains on a frozen backbone; gradual_unfreeze: the decoder plus a "
        "growing top of the backbone; lora: transformers models only.",
    )


class SegmentTrainConfig(EmaTrainConfig):
    """`train` with segmentation defaults; the best checkpoint is chosen by validation mIoU."""

    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(8, gt=0, description="Per device.")
    epochs: float = Field(10, gt=0)
    metric: str = Field("miou", description="Validation metric that selects the best checkpoint.")
    loss: Literal["cross_entropy", "dice_ce"] = Field(
        "cross_entropy",
        description="dice_ce: cross-entropy plus a soft Dice term over the classes in each batch, which weighs a "
        "small class's pixels like a large one's (thin or rare objects on a big background).",
    )


class SegmentEvalConfig(Strict):
    mode: Literal["resize", "slide"] = Field(
        "resize",
        description="resize: the whole image at data.image_size, logits resized back to it; slide: windows of "
        "data.image_size over the image at its own resolution (large images keep their detail).",
    )
    stride: float = Field(2 / 3, gt=0, le=1, description="slide: the step between windows, a fraction of a window.")

    @model_validator(mode="after")
    def _inert_keys(self, info: ValidationInfo) -> SegmentEvalConfig:
        slide = Inert(("stride",), self.mode != "slide", "with eval.mode: slide", "set eval.mode: slide")
        refuse_inert(self, info, [slide], prefix="eval.")
        return self


class SegmentConfig(Strict):
    """Recipe for `task: segment` — fine-tune a semantic segmentation model."""

    task: Literal["segment"] = "segment"
    model: str = Field(
        description="A backbone (builtin:efficientnet-lite0, timm:NAME, timm:local-dir:PATH) under `decoder`, or a "
        "transformers semantic-segmentation checkpoint (hub id or folder: SegFormer, UperNet, DPT, ...; Mask2Former / "
        "MaskFormer in semantic mode), or a segment run."
    )
    decoder: Literal["fpn", "unet"] = Field(
        "fpn", description="Decoder built on a builtin:/timm: backbone: FPN (sum of pyramid levels) or U-Net."
    )
    decoder_channels: int = Field(64, gt=0, description="Width of the decoder built on a builtin:/timm: backbone.")
    decoder_refine: int = Field(
        0,
        ge=0,
        description="FPN only: width of a full-resolution refinement that sees the image next to the upsampled "
        "logits (0: none). Sharpens thin structures the stride-4 FPN output blurs; costs little.",
    )
    output_dir: str
    seed: int = 42
    data: SegmentDataConfig
    tune: SegmentTuneConfig = SegmentTuneConfig()
    train: SegmentTrainConfig = SegmentTrainConfig()
    eval: SegmentEvalConfig = SegmentEvalConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        return list(SEGMENTATION_METRICS)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> SegmentConfig:
        backbone = is_backbone(self.model)
        if self.train.ema is not None and self.tune.method == "lora":
            raise ValueError("train.ema is not supported with tune.method=lora; remove one of them")
        if backbone and self.tune.method == "lora":
            raise ValueError(
                "tune.method lora applies to transformers segmentation models (attention layers); a builtin:/timm: "
                "backbone under a decoder trains with full, linear_probe or gradual_unfreeze"
            )
        rule = Inert(
            ("decoder", "decoder_channels", "decoder_refine"),
            not backbone,
            "with a builtin:/timm: backbone (a transformers checkpoint or a saved segmenter brings its own head)",
            "give model: builtin:NAME or timm:NAME",
        )
        refine = Inert(
            ("decoder_refine",),
            backbone and self.decoder != "fpn",
            "with decoder: fpn (U-Net already decodes at the image's resolution)",
            "remove decoder_refine or use decoder: fpn",
        )
        refuse_inert(self, info, [rule, refine])
        return self
