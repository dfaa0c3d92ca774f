"""Detectors behind one training interface: torchvision FCOS / RetinaNet / Faster R-CNN / SSDlite on a timm backbone
through an FPN, and transformers `AutoModelForObjectDetection` checkpoints with the class head replaced.

`Detector.forward(pixel_values, pixel_mask, targets)` takes a padded batch (images 0..1, top-left aligned; the mask
marks real pixels) and targets with xyxy pixel boxes of each unpadded image. Training mode returns {"loss", and each
loss term}; eval mode returns {"detections": [{"boxes", "scores", "labels"}]} in the same pixel frame. The libraries
do the detection itself; ours is only the glue (label offsets, box formats, padding, post-processing settings).
"""

from __future__ import annotations

import inspect
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune.core.errors import ModelError

DEFAULT_SIZE = 512  # torchvision detectors: longest image side when the recipe sets no data.image_size
LEVELS = 3  # feature levels the FPN takes: the backbone's last three (strides 8/16/32 on the usual CNNs)
ONE_BASED = ("faster_rcnn", "ssdlite", "maskrcnn")  # torchvision detectors whose class 0 is background
MASK_HEAD_LAYERS = 4  # Mask R-CNN's mask head: torchvision's four 3x3 convs, at the FPN's width (not 256: CPU cost)
# Mask R-CNN's RoIs sampled per training image (torchvision: 512, for COCO's crowded images): its box head runs on each,
# so 128 keeps a CPU step affordable (about 2.5x faster for 8 MNIST canvases in a one-off probe, not a benchmark);
# a quarter of them are still objects, plenty for images of up to ~30 objects.
MASK_RCNN_ROI_SAMPLES = 128
# Parameter names of the class / box predictors of the transformers detection families (DETR, Conditional and
# Deformable DETR, RT-DETR, D-FINE, YOLOS): what a linear probe trains and LoRA keeps fully trainable.
HF_HEADS = ("class_labels_classifier", "bbox_predictor", "class_embed", "bbox_embed", "enc_score_head", "enc_bbox_head")
_HF_BACKBONE = re.compile(r"(^|\.)(backbone|vit)\.")
_BLOCK = re.compile(r"\.(?:layer|layers|blocks|stages|block)\.(\d+)\.")


class TimmFPN(nn.Module):
    """A timm `features_only` body with torchvision's FPN over its last three levels: the backbone torchvision's
    detectors take (a dict of equal-width maps plus `out_channels`). Kept this small so the README can rebuild it."""

    def __init__(self, body: nn.Module, channels: int):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.body, self.out_channels = body, channels
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels()[-LEVELS:], channels)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn({str(i): f for i, f in enumerate(self.body(x)[-LEVELS:])})


class Detector(nn.Module):
    """One forward for the Trainer over a torchvision (`library="torchvision"`) or transformers detector."""

    def __init__(self, net: nn.Module, library: str, class_names: list[str], spec: dict[str, Any], processor=None):
        super().__init__()
        self.net, self.library, self.class_names = net, library, list(class_names)
        self.spec = spec  # what rebuilds it: visiontune.json of a torchvision export; image_size, mean, std
        self.processor = processor  # transformers: the checkpoint's image processor (its post-processing)
        self.image_size: int = spec["image_size"]
        self.category_ids = list(range(len(class_names)))  # the data's own ids (COCO's need not be contiguous)
        self.offset = 1 if spec.get("detector") in ONE_BASED else 0
        self._takes_mask = library == "transformers" and "pixel_mask" in inspect.signature(net.forward).parameters
        self.configure(conf=0.05, iou=None, max_detections=100)  # eval's defaults (DetectEvalConfig)

    # ---- training / evaluation
    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, targets: list[dict] | None = None
    ) -> dict[str, Any]:
        sizes = image_sizes(pixel_values, pixel_mask)
        if self.training:
            if targets is None:
                raise ValueError("a detector in training mode needs targets")
            losses = self._losses(pixel_values, pixel_mask, sizes, targets)
            total = losses.pop("loss") if "loss" in losses else sum(losses.values())
            return {"loss": total, **{k: v.detach() for k, v in losses.items()}}
        return {"detections": self._detect(pixel_values, pixel_mask, sizes)}

    def _losses(self, pixels, mask, sizes, targets) -> dict[str, torch.Tensor]:
        objects = [~t["iscrowd"] for t in targets]  # crowd regions are only ignored by evaluation, never learned
        if self.library == "torchvision":
            images = [pixels[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
            wanted = [
                {
                    "boxes": t["boxes"][keep],
                    "labels": t["labels"][keep] + self.offset,
                    **({"masks": t["masks"][keep]} if "masks" in t else {}),  # Mask R-CNN's mask targets
                }
                for t, keep in zip(targets, objects, strict=True)
            ]
            return dict(self.net(images, wanted))
        height, width = pixels.shape[-2:]
        labels = [
            {"class_labels": t["labels"][keep], "boxes": normalized_cxcywh(t["boxes"][keep], width, height)}
            for t, keep in zip(targets, objects, strict=True)
        ]
        out = self.net(pixel_values=self._normalized(pixels), labels=labels, **self._mask(mask))
        return {"loss": out.loss, **{k: v for k, v in (out.loss_dict or {}).items() if k.startswith("loss")}}

    def _detect(self, pixels, mask, sizes) -> list[dict[str, torch.Tensor]]:
        if self.library == "torchvision":
            found = self.net([pixels[i, :, :h, :w] for i, (h, w) in enumerate(sizes)])
            # Mask R-CNN adds "masks": [N, 1, h, w] probabilities over each (unpadded) image
            return [{**d, "labels": d["labels"] - self.offset} for d in found]
        out = self.net(pixel_values=self._normalized(pixels), **self._mask(mask))
        canvas = [tuple(pixels.shape[-2:])] * len(sizes)  # boxes are relative to the padded canvas, as trained
        found = self.processor.post_process_object_detection(out, threshold=self.conf, target_sizes=canvas)
        return [self._trimmed(d, size) for d, size in zip(found, sizes, strict=True)]

    def _trimmed(self, found: dict, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """transformers post-processing has no NMS or detection cap: clip to the image, NMS (eval.iou), top-k."""
        from torchvision.ops import batched_nms, clip_boxes_to_image

        boxes, scores, labels = (
            clip_boxes_to_image(found["boxes"].float(), size),
            found["scores"].float(),
            found["labels"],
        )
        keep = batched_nms(boxes, scores, labels, self.iou) if self.iou is not None else scores.argsort(descending=True)
        keep = keep[: self.max_detections]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.spec["image_mean"], device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.spec["image_std"], device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def _mask(self, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"pixel_mask": mask.long()} if self._takes_mask and mask is not None else {}

    @property
    def segments(self) -> bool:
        """Whether it predicts instance masks (Mask R-CNN)."""
        return self.spec.get("detector") == "maskrcnn"

    # ---- settings and parameter groups
    def configure(self, conf: float, iou: float | None, max_detections: int) -> None:
        """Post-processing: score threshold, NMS IoU (None: the detector's own) and detections per image."""
        self.conf, self.iou, self.max_detections = conf, iou, max_detections
        if self.library == "torchvision":
            target = self.net.roi_heads if hasattr(self.net, "roi_heads") else self.net
            target.score_thresh, target.detections_per_img = conf, max_detections
            if iou is not None:
                target.nms_thresh = iou

    def head_names(self) -> list[str]:
        """Names of the detection head's parameters (class and box predictors): what a linear probe trains."""
        names = [n for n, _ in self.named_parameters()]
        if self.library == "torchvision":
            return [n for n in names if n.startswith(("net.head.", "net.rpn.", "net.roi_heads."))]
        return [n for n in names if any(f".{h}." in n for h in HF_HEADS)]

    def backbone_names(self) -> list[str]:
        names = [n for n, _ in self.named_parameters()]
        if self.library == "torchvision":
            return [n for n in names if n.startswith("net.backbone.body.")]
        return [n for n in names if _HF_BACKBONE.search(n) and n not in set(self.head_names())]

    def layer_groups(self) -> tuple[list[list[str]], list[str]]:
        """(backbone blocks from input to output, everything else): gradual unfreezing thaws the backbone from the
        top; the neck and the head always train."""
        body = self.backbone_names()
        rest = [n for n, _ in self.named_parameters() if n not in set(body)]
        stem, blocks = [], {}
        for name in body:
            match = _BLOCK.search(name)
            (blocks.setdefault(int(match.group(1)), []) if match else stem).append(name)
        groups = [stem, *(blocks[k] for k in sorted(blocks))]
        return [g for g in groups if g], rest

    def enable_grad_checkpointing(self) -> bool:
        from visiontune.core.backbones import enable_checkpointing

        return enable_checkpointing(self.net.backbone.body if self.library == "torchvision" else self.net)

    def train(self, mode: bool = True) -> Detector:
        """Batch norms whose parameters are all frozen keep their running statistics (a frozen backbone stays the
        pretrained one)."""
        from visiontune.classify.freeze import freeze_frozen_norms

        super().train(mode)
        freeze_frozen_norms(self)
        return self


def image_sizes(pixels: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[int, int]]:
    """(height, width) of each unpadded image of a top-left aligned padded batch."""
    if mask is None:
        return [tuple(pixels.shape[-2:])] * pixels.shape[0]
    return [(int(m.any(1).sum()), int(m.any(0).sum())) for m in mask.bool()]


def normalized_cxcywh(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    from torchvision.ops import box_convert

    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    return box_convert(boxes.float(), "xyxy", "cxcywh") / scale


# ------------------------------------------------------------------------------------------------- building


def build_detector(
    model: str, class_names: list[str] | None, detector: str = "fcos", fpn_channels: int = 64, image_size=None
) -> Detector:
    """The detector a recipe's `model` names, with a head for `class_names` (None: keep a saved model's classes).
    builtin:/timm: sources are backbones under a torchvision `detector`; folders and hub ids are transformers
    detectors, or detectors visiontune saved (a run folder)."""
    from visiontune.core.backbones import feature_body
    from visiontune.core.manifest import read_manifest
    from visiontune.core.sources import parse_source

    source = parse_source(model, "model")
    if source.kind in ("builtin", "timm"):
        arch, args, body = feature_body(source)
        spec = torchvision_spec(detector, arch, args, body, class_names or [], fpn_channels, image_size)
        return Detector(make_torchvision(spec, TimmFPN(body, fpn_channels)), "torchvision", class_names or [], spec)
    manifest = read_manifest(source.path) if source.path is not None else {}
    if manifest.get("kind") == "detector" and manifest.get("library") == "torchvision":
        return _saved_torchvision(source.path, manifest, class_names, image_size)
    return _transformers(source.name, class_names, image_size, manifest)


def torchvision_spec(
    detector: str, arch: str, args: dict, body: nn.Module, class_names: list[str], channels: int, image_size
) -> dict[str, Any]:
    """Everything that rebuilds the detector with plain timm + torchvision (the export's visiontune.json)."""
    from visiontune.core.backbones import body_normalization

    strides = body.feature_info.reduction()[-LEVELS:]
    if detector == "fcos":  # one point per location; torchvision's FCOS assigns objects to levels by these sizes
        sizes, ratios = [[s] for s in strides], [[1.0]] * LEVELS
    else:  # three scales and three shapes per location, 4x the stride as torchvision's defaults
        sizes = [[round(4 * s * 2 ** (k / 3), 2) for k in range(3)] for s in strides]
        ratios = [[0.5, 1.0, 2.0]] * LEVELS
    mean, std = body_normalization(body)
    return {
        "detector": detector,
        "timm_model": arch,
        "timm_args": args,
        "fpn_channels": channels,
        "num_classes": len(class_names) + (1 if detector in ONE_BASED else 0),
        "label_offset": 1 if detector in ONE_BASED else 0,
        "anchor_sizes": sizes,
        "aspect_ratios": ratios,
        "image_size": image_size or DEFAULT_SIZE,
        "image_mean": mean,
        "image_std": std,
    }


def make_torchvision(spec: dict[str, Any], backbone: nn.Module) -> nn.Module:
    from torchvision.models import detection
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.ssdlite import SSDLiteHead
    from torchvision.ops import MultiScaleRoIAlign

    kind, n, size = spec["detector"], spec["num_classes"], spec["image_size"]
    norm = {"image_mean": spec["image_mean"], "image_std": spec["image_std"]}
    anchors = AnchorGenerator(spec["anchor_sizes"], spec["aspect_ratios"])
    if kind == "fcos":
        return detection.FCOS(backbone, n, anchor_generator=anchors, min_size=size, max_size=size, **norm)
    if kind == "retinanet":
        return detection.RetinaNet(backbone, n, anchor_generator=anchors, min_size=size, max_size=size, **norm)
    if kind == "faster_rcnn":
        pool = MultiScaleRoIAlign([str(i) for i in range(LEVELS)], output_size=7, sampling_ratio=2)
        return detection.FasterRCNN(
            backbone, n, rpn_anchor_generator=anchors, box_roi_pool=pool, min_size=size, max_size=size, **norm
        )
    if kind == "maskrcnn":
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        pool = MultiScaleRoIAlign([str(i) for i in range(LEVELS)], output_size=7, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign([str(i) for i in range(LEVELS)], output_size=14, sampling_ratio=2)
        width = backbone.out_channels
        net = detection.MaskRCNN(
            backbone,
            n,
            rpn_anchor_generator=anchors,
            box_roi_pool=pool,
            mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(width, [width] * MASK_HEAD_LAYERS, 1),
            box_batch_size_per_image=MASK_RCNN_ROI_SAMPLES,
            min_size=size,
            max_size=size,
            **norm,
        )
        # torchvision builds its mask predictor for a 256-wide head (and takes no predictor with num_classes)
        net.roi_heads.mask_predictor = MaskRCNNPredictor(width, width, n)
        return net
    boxes = DefaultBoxGenerator([[2, 3]] * LEVELS, min_ratio=0.2, max_ratio=0.95)
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # torchvision's SSDlite settings
    head = SSDLiteHead([backbone.out_channels] * LEVELS, boxes.num_anchors_per_location(), n, norm_layer)
    return SSD(backbone, boxes, (size, size), n, head=head, **norm)


def _saved_torchvision(folder: Path, manifest: dict, class_names: list[str] | None, image_size) -> Detector:
    """A torchvision detector visiontune exported: rebuilt from its manifest, weights from model.safetensors."""
    from safetensors.torch import load_file

    from visiontune.core.backbones import rebuilt_body

    saved = manifest["class_names"]
    if class_names is not None and list(class_names) != list(saved):
        raise ModelError(
            f"model: {folder} detects {saved}, not the data's {class_names}; start from its backbone instead "
            f"(model: builtin:/timm:NAME with detector: {manifest['detector']})."
        )
    spec = {k: v for k, v in manifest.items() if k not in ("format", "kind", "library", "class_names", "category_ids")}
    if image_size:
        spec["image_size"] = image_size
    body = rebuilt_body(spec["timm_model"], spec["timm_args"])
    net = make_torchvision(spec, TimmFPN(body, spec["fpn_channels"]))
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return _with_ids(Detector(net, "torchvision", saved, spec), manifest)


def _transformers(name: str, class_names: list[str] | None, image_size, manifest: dict) -> Detector:
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from visiontune.classify.resolve import new_head

    try:
        net = AutoModelForObjectDetection.from_pretrained(name, **new_head(class_names))
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model: {name} cannot be resolved offline as a transformers object detector "
            f"({str(err).splitlines()[0]}); give a detection checkpoint folder or a cached hub id, or a backbone "
            "(builtin:efficientnet-lite0, timm:NAME) under `detector`."
        ) from None
    names = class_names or [net.config.id2label[i] for i in sorted(net.config.id2label)]
    spec = {
        "image_size": image_size or manifest.get("image_size") or processor_size(processor),
        "image_mean": list(getattr(processor, "image_mean", None) or (0.485, 0.456, 0.406)),
        "image_std": list(getattr(processor, "image_std", None) or (0.229, 0.224, 0.225)),
    }
    return _with_ids(Detector(net, "transformers", names, spec, processor), {} if class_names else manifest)


def _with_ids(detector: Detector, manifest: dict) -> Detector:
    detector.category_ids = manifest.get("category_ids") or detector.category_ids
    return detector


def processor_size(processor) -> int:
    """The longest image side a transformers image processor resizes to."""
    size = processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    for key in ("longest_edge", "max_height", "height", "shortest_edge"):
        if get(key):
            return int(get(key))
    return DEFAULT_SIZE


# Attention projection names in the transformers detection families (DETR-style q/k/v, ViT-style query/value).
_LORA_TARGETS = ("q_proj", "v_proj", "query", "value")


def apply_lora(model: Detector, cfg) -> None:
    """LoRA adapters on the attention projections of a transformers detector (PEFT); the class and box predictors
    stay fully trainable (`modules_to_save`)."""
    from visiontune.classify.lora import wrap_lora

    if model.library != "transformers":
        raise ModelError(
            "tune.method lora applies to transformers detectors; use full, linear_probe or gradual_unfreeze."
        )
    heads = sorted({n.rsplit(".", 1)[-1] for n, _ in model.net.named_modules() if n.rsplit(".", 1)[-1] in HF_HEADS})
    model.net = wrap_lora(model.net, cfg, _LORA_TARGETS, heads, "the detector")
