"""Semantic segmenters behind one training interface: a decoder (FPN / U-Net, segment/decoders.py) on a timm
backbone, transformers `AutoModelForSemanticSegmentation` checkpoints (SegFormer, UperNet, DPT, ...) and
Mask2Former / MaskFormer in semantic mode (segment/universal.py), with the class head replaced.

`Segmenter.forward(pixel_values, labels=None)` takes images 0..1 [B, 3, H, W] and class-id masks [B, H, W] and
returns {"loss", "logits"}: logits resized (bilinear) to the masks' size, cross-entropy over every pixel but
`ignore_index`. transformers models compute their own loss (auxiliary heads included); ours is only the glue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from visiontune.core.errors import ModelError

DEFAULT_SIZE = 512  # decoders on a timm backbone: the training square when the recipe sets no data.image_size
KIND = "segmenter"  # the manifest kind of an exported segmenter
# Attention projection names in the transformers segmentation families (SegFormer, Swin / BEiT / ViT backbones).
_LORA_TARGETS = ("query", "value", "q_proj", "v_proj", "qkv")


class Segmenter(nn.Module):
    """One forward for the Trainer over a decoder on a timm backbone (`library="timm"`) or a transformers model."""

    def __init__(
        self,
        net: nn.Module,
        library: str,
        class_names: list[str],
        spec: dict[str, Any],
        processor=None,
        universal: bool = False,
    ):
        super().__init__()
        self.net, self.library, self.class_names = net, library, list(class_names)
        self.universal = universal  # mask queries (Mask2Former, MaskFormer): scores, not logits (segment/universal.py)
        self.spec = spec  # what rebuilds it (the export's visiontune.json): image_size, mean, std, decoder...
        self.processor = processor  # transformers: the checkpoint's image processor (exported resized)
        self.dice = False  # train.loss dice_ce: add soft_dice_loss to the cross-entropy (set by the task)
        self.image_size: int = spec["image_size"]
        self.ignore_index: int = spec.get("ignore_index", 255)
        self.register_buffer("mean", torch.tensor(spec["image_mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec["image_std"]).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        size = tuple(labels.shape[-2:]) if labels is not None else tuple(pixel_values.shape[-2:])
        if self.universal and labels is not None:
            return self._universal_forward(pixel_values, labels, size)
        if self.library == "transformers" and labels is not None:
            out = self.net(pixel_values=self._normalized(pixel_values), labels=labels.long())
            logits = resized(out.logits, size)
            loss = out.loss if self._any_counted(labels) else 0 * logits.sum()
            return {"loss": loss + self._dice(logits, labels), "logits": logits}
        logits = self.logits(pixel_values, size)
        if labels is None:
            return {"logits": logits}
        loss = masked_cross_entropy(logits, labels, self.ignore_index) + self._dice(logits, labels)
        return {"loss": loss, "logits": logits}

    def _universal_forward(self, pixels: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> dict:
        from visiontune.segment.universal import mask_targets, scores_as_logits, semantic_scores

        x = self._normalized(pixels)
        if not self._any_counted(labels):  # nothing to match: the library's loss would divide by no mask
            logits = resized(semantic_scores(self.processor, self.net(pixel_values=x)), size)
            return {"loss": 0 * logits.sum(), "logits": scores_as_logits(logits)}
        masks, classes = mask_targets(labels, self.ignore_index)
        out = self.net(pixel_values=x, mask_labels=masks, class_labels=classes)
        return {"loss": out.loss, "logits": scores_as_logits(resized(semantic_scores(self.processor, out), size))}

    def _dice(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | float:
        return soft_dice_loss(logits, labels, self.ignore_index) if self.dice else 0.0

    def logits(self, pixel_values: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class logits [B, C, *size] (default: the input's size), resized once from the network's own output."""
        return resized(self.raw_logits(pixel_values), size or tuple(pixel_values.shape[-2:]))

    def raw_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The network's logits at its own resolution (a decoder's finest level, SegFormer's quarter size); for
        mask-query models the per-class scores of their processor's semantic post-processing (argmax the same,
        resized as transformers resizes them)."""
        x = self._normalized(pixel_values)
        if self.universal:
            from visiontune.segment.universal import semantic_scores

            return semantic_scores(self.processor, self.net(pixel_values=x))
        return self.net(x) if self.library == "timm" else self.net(pixel_values=x).logits

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)

    def _any_counted(self, labels: torch.Tensor) -> bool:
        # a batch with no counted pixel: the library's mean cross-entropy would be 0/0 = nan and poison the weights
        return bool((labels != self.ignore_index).any())

    # ---- parameter groups (tuning plans)
    def backbone_prefix(self) -> str:
        if self.library == "timm":
            return "net.body."
        if self.universal:  # the image backbone inside the pixel-level module; the rest is the decode head
            return "net.model.pixel_level_module.encoder."
        prefix = getattr(self.net, "base_model_prefix", "") or "backbone"
        return f"net.{prefix if hasattr(self.net, prefix) else 'backbone'}."

    def backbone_names(self) -> list[str]:
        prefix = self.backbone_prefix()
        return [n for n, _ in self.named_parameters() if n.startswith(prefix)]

    def decoder_names(self) -> list[str]:
        """Everything but the backbone (neck, decode head, auxiliary head): what a linear probe trains."""
        body = set(self.backbone_names())
        return [n for n, _ in self.named_parameters() if n not in body]

    def layer_groups(self) -> tuple[list[list[str]], list[str]]:
        """(backbone blocks from input to output, the decoder): gradual unfreezing thaws the backbone from the top
        while the decoder always trains."""
        from visiontune.classify.layers import indexed_groups

        return [g for g in indexed_groups(self.backbone_names()) if g], self.decoder_names()

    def enable_grad_checkpointing(self) -> bool:
        from visiontune.core.backbones import enable_checkpointing

        return enable_checkpointing(self.net.body if self.library == "timm" else self.net)

    def train(self, mode: bool = True) -> Segmenter:
        from visiontune.classify.freeze import freeze_frozen_norms

        super().train(mode)
        freeze_frozen_norms(self)  # a frozen backbone keeps its pretrained batch statistics
        return self


def resized(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the pixels that count; 0 (with a graph) when none does."""
    counted = (labels != ignore_index).sum()
    total = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="sum")
    return total / counted.clamp(min=1)


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 - soft Dice per class over the batch's counted pixels, averaged over the classes the labels hold (a class
    absent from the batch would only push its probabilities to 0, which the cross-entropy already does). Our own:
    torchmetrics' Dice is a metric without gradients; the loss libraries (MONAI, smp) are not dependencies."""
    counted = (labels != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(1) * counted
    target = F.one_hot(labels.long().where(counted[:, 0], 0), logits.shape[1]).permute(0, 3, 1, 2) * counted
    overlap, sizes = (probs * target).sum((0, 2, 3)), (probs + target).sum((0, 2, 3))
    present = target.sum((0, 2, 3)) > 0
    if not present.any():
        return 0 * logits.sum()
    return (1 - 2 * overlap[present] / sizes[present].clamp(min=1e-6)).mean()


# ------------------------------------------------------------------------------------------------- building


def build_segmenter(
    model: str,
    class_names: list[str] | None,
    decoder: str = "fpn",
    channels: int = 64,
    image_size: int | None = None,
    ignore_index: int = 255,
    refine: int = 0,
) -> Segmenter:
    """The segmenter a recipe's `model` names, with a head for `class_names` (None: keep a saved model's classes).
    builtin:/timm: sources are backbones under a `decoder`; folders and hub ids are transformers models, or
    segmenters visiontune saved (a run folder)."""
    from visiontune.core.backbones import body_normalization, feature_body
    from visiontune.core.manifest import read_manifest
    from visiontune.core.sources import parse_source
    from visiontune.segment.decoders import DECODERS

    source = parse_source(model, "model")
    if source.kind in ("builtin", "timm"):
        arch, args, body = feature_body(source)
        mean, std = body_normalization(body)
        spec = {
            "timm_model": arch,
            "timm_args": args,
            "decoder": decoder,
            "decoder_channels": channels,
            "decoder_refine": refine if decoder == "fpn" else 0,  # U-Net decodes at full resolution already
            "image_size": image_size or DEFAULT_SIZE,
            "image_mean": mean,
            "image_std": std,
            "ignore_index": ignore_index,
        }
        net = DECODERS[decoder](body, channels, len(class_names or []), **decoder_options(spec))
        return Segmenter(net, "timm", class_names or [], spec)
    manifest = read_manifest(source.path) if source.path is not None else {}
    if manifest.get("kind") == KIND and manifest.get("library") == "timm":
        return _saved_decoder(source.path, manifest, class_names, image_size, ignore_index)
    return _transformers(source.name, class_names, image_size, ignore_index, manifest)


def _saved_decoder(
    folder: Path, manifest: dict, class_names: list[str] | None, image_size: int | None, ignore_index: int
) -> Segmenter:
    """A decoder on a timm backbone that visiontune exported: rebuilt from its manifest, weights from
    model.safetensors (the README's lines do the same without visiontune)."""
    from safetensors.torch import load_file

    from visiontune.core.backbones import rebuilt_body
    from visiontune.segment.decoders import DECODERS

    saved = manifest["class_names"]
    if class_names is not None and list(class_names) != list(saved):
        raise ModelError(
            f"model: {folder} segments {saved}, not the data's {class_names}; start from its backbone instead "
            f"(model: builtin:/timm:NAME with decoder: {manifest['decoder']})."
        )
    spec = saved_spec(manifest)
    spec["image_size"] = image_size or spec["image_size"]
    spec["ignore_index"] = ignore_index if class_names is not None else spec.get("ignore_index", 255)
    body = rebuilt_body(spec["timm_model"], spec["timm_args"])
    net = DECODERS[spec["decoder"]](body, spec["decoder_channels"], len(saved), **decoder_options(spec))
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return Segmenter(net, "timm", saved, spec)


def decoder_options(spec: dict[str, Any]) -> dict[str, int]:
    """Decoder arguments beyond width and classes (the FPN's refinement; a manifest written before it has none)."""
    return {"refine": spec["decoder_refine"]} if spec["decoder"] == "fpn" and spec.get("decoder_refine") else {}


def saved_spec(manifest: dict) -> dict[str, Any]:
    """The settings an exported segmenter's manifest holds beyond its format, kind, library and classes."""
    return {k: v for k, v in manifest.items() if k not in ("format", "kind", "library", "class_names")}


def _transformers(
    name: str, class_names: list[str] | None, image_size: int | None, ignore_index: int, manifest: dict
) -> Segmenter:
    from transformers import AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation

    from visiontune.classify.resolve import pretrained_with_head
    from visiontune.detect.model import processor_size
    from visiontune.segment.universal import check_universal, model_type

    instead = (
        "a checkpoint folder or cached hub id of an AutoModelForSemanticSegmentation (SegFormer, UperNet, DPT, ...) "
        "or a Mask2Former / MaskFormer, or a backbone (builtin:efficientnet-lite0, timm:NAME) under `decoder`"
    )
    kind = model_type(name)
    universal = check_universal(kind)
    auto = AutoModelForUniversalSegmentation if universal else AutoModelForSemanticSegmentation
    net = pretrained_with_head(auto, name, class_names, "segmentation model", instead)
    if class_names is None:
        ignore_index = manifest.get("ignore_index", ignore_index)
    net.config.semantic_loss_ignore_index = ignore_index  # the library's loss then skips our ignored pixels
    names = class_names or [net.config.id2label[i] for i in sorted(net.config.id2label)]
    processor = _processor(name, kind if universal else None)
    spec = {
        **(saved_spec(manifest) if class_names is None else {}),  # a saved model's inference and mask reading
        "image_size": image_size or manifest.get("image_size") or processor_size(processor),
        "image_mean": list(getattr(processor, "image_mean", None) or (0.485, 0.456, 0.406)),
        "image_std": list(getattr(processor, "image_std", None) or (0.229, 0.224, 0.225)),
        "ignore_index": ignore_index,
    }
    return Segmenter(net, "transformers", names, spec, processor, universal)


def _processor(name: str, universal: str | None = None):
    """The checkpoint's image processor; when it saved none, its family's (universal models: they post-process
    the queries) or SegFormer's defaults (ImageNet statistics)."""
    from transformers import AutoImageProcessor, SegformerImageProcessor

    from visiontune.segment.universal import default_processor

    try:
        return AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        return default_processor(universal) if universal else SegformerImageProcessor()


def apply_lora(model: Segmenter, cfg) -> None:
    """LoRA adapters on the attention projections of a transformers segmenter (PEFT); the decode heads stay fully
    trainable (`modules_to_save`)."""
    from visiontune.classify.lora import wrap_lora

    if model.library != "transformers" or model.universal:
        raise ModelError(
            "tune.method lora applies to transformers semantic-segmentation models (not to decoders on a timm "
            "backbone or Mask2Former / MaskFormer); use full, linear_probe or gradual_unfreeze."
        )
    encoder = model.backbone_prefix().removeprefix("net.").rstrip(".")
    heads = [name for name, _ in model.net.named_children() if name != encoder]
    model.net = wrap_lora(model.net, cfg, _LORA_TARGETS, heads, "the segmentation model")
