"""`ImageClassifier`: one training interface over timm and transformers backbones, plus save/load in formats the
plain libraries read back (timm `local-dir:` folders, transformers `save_pretrained` folders), each carrying the
training preprocessing in the form its library resolves (timm `pretrained_cfg`, transformers
`preprocessor_config.json`), so the plain library's own pipeline predicts what visiontune predicts."""

from __future__ import annotations

import inspect
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.core.manifest import read_manifest, write_manifest
from visiontune.core.transforms import Preprocess

# Export args timm reads off the live model (and rejects when they disagree with it), never from the source config.
_LIVE_TIMM_ARGS = ("num_classes", "img_size", "in_chans", "global_pool")


class ImageClassifier(nn.Module):
    """Backbone + head returning `{"loss", "logits"}` as the transformers Trainer expects.

    Labels may be class indices [B] or soft targets [B, C] (mixup/cutmix).
    """

    def __init__(self, backbone: nn.Module, kind: str, class_names: list[str], preprocess: Preprocess):
        super().__init__()
        self.backbone, self.kind = backbone, kind
        self.class_names, self.preprocess = list(class_names), preprocess
        self.label_smoothing = 0.0

    @property
    def preprocess(self) -> Preprocess:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, pre: Preprocess) -> None:
        """A fixed-size timm ViT follows the input size it is given (timm resamples its position embeddings once),
        so `data.image_size` trains and exports at that size instead of failing timm's input-size assertion."""
        self._preprocess = pre
        if self.kind == "timm":
            _fit_timm_input_size(self.backbone, pre.image_size)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.kind == "timm":
            logits = self.backbone(pixel_values)  # [B, C]
        else:
            logits = self.backbone(pixel_values=pixel_values, **_hf_size_kwargs(self.backbone, pixel_values)).logits
        if labels is None:
            return {"logits": logits}
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}

    def head_names(self) -> list[str]:
        """Parameter-name prefixes of the classification head (always trained)."""
        if self.kind == "timm":
            classifier = self.backbone.pretrained_cfg.get("classifier", "head")
            names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        else:
            names = [n for n, m in self.backbone.named_children() if n in ("classifier", "head", "fc", "score")]
        return [f"backbone.{n}" for n in names]

    def enable_grad_checkpointing(self) -> bool:
        if self.kind == "timm" and hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(True)
            return True
        if self.kind == "hf" and getattr(self.backbone, "supports_gradient_checkpointing", False):
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return True
        return False

    def save(self, directory: str | Path, adapter_dir: str | Path | None = None) -> Path:
        """Write a folder that plain timm / transformers load and preprocess as trained, plus `visiontune.json`.

        A LoRA backbone is merged first (its PEFT adapter is kept in `adapter_dir` when given)."""
        from visiontune.classify.lora import merge_lora

        merge_lora(self, adapter_dir)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "timm":
            self._save_timm(directory)
        else:
            self._save_hf(directory)
        write_manifest(
            directory,
            "classifier",
            library=self.kind,
            class_names=self.class_names,
            preprocess=self.preprocess.to_dict(),
        )
        return directory

    def _save_timm(self, directory: Path) -> None:
        from timm.models import save_for_hf

        pre = self.preprocess
        # Architecture args a local-dir model was built with; size, classes and pooling come from the live model.
        args = getattr(self.backbone, "pretrained_model_args", None) or {}
        args = {k: v for k, v in args.items() if k not in _LIVE_TIMM_ARGS}
        # crop_pct 1.0 in center mode makes timm's eval transform Resize(edge) + CenterCrop(edge): `eval_transform`.
        data_config = {
            "input_size": (len(pre.mean), pre.image_size, pre.image_size),
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": tuple(pre.mean),
            "std": tuple(pre.std),
            "interpolation": pre.interpolation,
        }
        save_for_hf(
            self.backbone,
            str(directory),
            model_config={"label_names": self.class_names},
            model_args=args or None,
            data_config=data_config,
            safe_serialization=True,
        )

    def _save_hf(self, directory: Path) -> None:
        config, size = self.backbone.config, self.preprocess.image_size
        config.id2label = dict(enumerate(self.class_names))
        config.label2id = {n: i for i, n in enumerate(self.class_names)}
        tables = _resized_position_tables(self.backbone, size)
        trained_size = getattr(config, "image_size", None)
        try:
            if tables:  # the export runs natively at the trained size; the live model keeps interpolating
                config.image_size = size
            state = {**self.backbone.state_dict(), **tables} if tables else None
            self.backbone.save_pretrained(directory, state_dict=state)
        finally:
            if tables:
                config.image_size = trained_size
        _image_processor(self.preprocess).save_pretrained(directory)


def read_meta(directory: Path) -> dict | None:
    return read_manifest(directory) or None


def _fit_timm_input_size(backbone: nn.Module, size: int) -> None:
    current = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if current is not None and tuple(current) != (size, size) and hasattr(backbone, "set_input_size"):
        backbone.set_input_size(img_size=(size, size))


def _config_size(config) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return size, size
    return tuple(size[-2:]) if isinstance(size, (list, tuple)) and len(size) >= 2 else None


@lru_cache
def _takes_interpolation(model_type: type) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(model_type.forward).parameters


def _hf_size_kwargs(backbone: nn.Module, pixel_values: torch.Tensor) -> dict[str, bool]:
    """ViT-style transformers models reject inputs of another size unless told to interpolate position embeddings."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone  # through PEFT
    native = _config_size(base.config)
    if native is None or tuple(pixel_values.shape[-2:]) == native or not _takes_interpolation(type(base)):
        return {}
    return {"interpolate_pos_encoding": True}


@torch.no_grad()
def _resized_position_tables(backbone: nn.Module, size: int) -> dict[str, torch.Tensor]:
    """Position-embedding tables resampled to `size` by the model's own `interpolate_pos_encoding` (what training
    ran), keyed as in the state dict; empty when the model is at its native size or has no such table."""
    config = backbone.config
    native, patch = _config_size(config), getattr(config, "patch_size", None)
    if native is None or native == (size, size) or patch is None:
        return {}
    patch = patch if isinstance(patch, int) else patch[0]
    tables = {}
    for name, module in backbone.named_modules():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, nn.Parameter) and hasattr(module, "interpolate_pos_encoding") and table.ndim == 3:
            extra = table.shape[1] - (native[0] // patch) * (native[1] // patch)  # [CLS] / distillation tokens
            tokens = table.new_zeros(1, (size // patch) ** 2 + extra, table.shape[-1])
            tables[f"{name}.position_embeddings"] = module.interpolate_pos_encoding(tokens, size, size).contiguous()
    return tables


def _image_processor(pre: Preprocess):
    """`eval_transform` (shortest edge to `image_size`, centre crop, normalise) as an AutoImageProcessor: the
    CLIP processor is transformers' generic resize-shortest-edge + centre-crop pipeline."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    edge = pre.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": edge},
        crop_size={"height": edge, "width": edge},
        resample=PILImageResampling.BICUBIC if pre.interpolation == "bicubic" else PILImageResampling.BILINEAR,
        image_mean=list(pre.mean),
        image_std=list(pre.std),
        do_resize=True,
        do_center_crop=True,
        do_convert_rgb=True,
    )
