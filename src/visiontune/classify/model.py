"""`ImageClassifier`: one training interface over timm and transformers backbones, plus save/load in formats the
plain libraries read back (timm `local-dir:` folders, transformers `save_pretrained` folders)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.core.transforms import Preprocess

META_FILE = "visiontune.json"


class ImageClassifier(nn.Module):
    """Backbone + head returning `{"loss", "logits"}` as the transformers Trainer expects.

    Labels may be class indices [B] or soft targets [B, C] (mixup/cutmix).
    """

    def __init__(self, backbone: nn.Module, kind: str, class_names: list[str], preprocess: Preprocess):
        super().__init__()
        self.backbone, self.kind = backbone, kind
        self.class_names, self.preprocess = list(class_names), preprocess
        self.label_smoothing = 0.0

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.kind == "timm":
            logits = self.backbone(pixel_values)  # [B, C]
        else:
            logits = self.backbone(pixel_values=pixel_values).logits  # [B, C]
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
        """Write a folder that plain timm / transformers load, plus `visiontune.json` (classes, preprocessing).

        A LoRA backbone is merged first (its PEFT adapter is kept in `adapter_dir` when given)."""
        from visiontune.classify.lora import merge_lora

        merge_lora(self, adapter_dir)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "timm":
            from timm.models import save_for_hf

            # Architecture args a local-dir model was built with; the class count is the current head's.
            args = dict(getattr(self.backbone, "pretrained_model_args", None) or {})
            args.pop("num_classes", None)
            save_for_hf(
                self.backbone,
                str(directory),
                model_config={"label_names": self.class_names},
                model_args=args or None,
                safe_serialization=True,
            )
        else:
            self.backbone.config.id2label = dict(enumerate(self.class_names))
            self.backbone.config.label2id = {n: i for i, n in enumerate(self.class_names)}
            self.backbone.save_pretrained(directory)
        meta = {"kind": self.kind, "class_names": self.class_names, "preprocess": self.preprocess.to_dict()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return directory


def read_meta(directory: Path) -> dict | None:
    path = directory / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None
