"""Vision encoders as feature extractors for an assembled VLM: any source → patch features [B, N, Dv] from one
hidden layer, plus the image processor that feeds it.

Sources: a transformers CLIP/SigLIP checkpoint (full dual encoder or vision tower, hub id or folder), `timm:NAME`,
or `builtin:efficientnet-lite0`. CNN feature maps [B, C, H, W] become H·W tokens of width C.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visiontune.core.errors import ModelError
from visiontune.core.sources import ModelSource, parse_source, pretrained_config

__all__ = ["TimmImageProcessor", "VisionFeatures", "load_vision", "resolve_vision"]


class VisionFeatures(nn.Module):
    """Wraps an encoder; `forward(pixel_values)` returns the features of hidden layer `layer` [B, N, Dv].

    `source` is "hf" (a transformers vision tower) or "timm". For timm, layer -1 is `forward_features`; other
    layers come from `forward_intermediates`.
    """

    def __init__(self, encoder: nn.Module, source: str, layer: int, drop_cls: bool, arch: str | None = None):
        super().__init__()
        self.encoder, self.source, self.layer, self.drop_cls, self.arch = encoder, source, layer, drop_cls, arch
        self.has_cls = False
        with torch.no_grad():
            probe = self._hidden(torch.zeros(1, 3, *self.input_size()))
        self.has_cls = self.source == "hf" and probe.shape[1] == self._hf_patches() + 1
        self.width, self.num_patches = probe.shape[-1], probe.shape[1] - int(self.has_cls and drop_cls)

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self._hidden(pixel_values)  # [B, N(+1), Dv]
        return features[:, 1:] if self.has_cls and self.drop_cls else features

    def _hidden(self, pixel_values: Tensor) -> Tensor:
        if self.source == "hf":
            return self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.layer]
        if self.layer == -1:
            out = self.encoder.forward_features(pixel_values)
        else:
            out = self.encoder.forward_intermediates(pixel_values, indices=[self.layer], intermediates_only=True)[0]
        if out.ndim == 4:  # CNN map [B, C, H, W] → [B, H·W, C]
            return out.flatten(2).transpose(1, 2)
        return out[:, getattr(self.encoder, "num_prefix_tokens", 0) :] if self.drop_cls else out

    def input_size(self) -> tuple[int, int]:
        if self.source == "hf":
            size = self.encoder.config.image_size
            return (size, size)
        return tuple(self.encoder.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])

    def _hf_patches(self) -> int:
        config = self.encoder.config
        return (config.image_size // config.patch_size) ** 2

    def spec(self) -> dict[str, Any]:
        return {"source": self.source, "arch": self.arch, "layer": self.layer, "drop_cls": self.drop_cls}


class TimmImageProcessor:
    """Resize + centre crop + normalise for timm encoders, with the call signature of a transformers image
    processor (`processor(images=[...], return_tensors="pt")["pixel_values"]`)."""

    def __init__(self, image_size: int, mean: list[float], std: list[float], interpolation: str = "bicubic"):
        from visiontune.core.transforms import Preprocess, eval_transform

        self.config = {"image_size": image_size, "mean": list(mean), "std": list(std), "interpolation": interpolation}
        self._transform = eval_transform(Preprocess(image_size, tuple(mean), tuple(std), interpolation))

    def __call__(self, images: list, return_tensors: str = "pt", **_: Any) -> dict[str, Tensor]:
        return {"pixel_values": torch.stack([self._transform(im.convert("RGB")) for im in images])}


def resolve_vision(name: str, layer: int, drop_cls: bool, image_size: int | None) -> tuple[VisionFeatures, Any]:
    """(features module, image processor) for a recipe's `vision:`."""
    source = parse_source(name, "vision")
    if source.kind == "builtin":
        return _builtin(source.name, layer, drop_cls, image_size)
    if source.kind == "timm":
        import timm

        try:
            encoder = timm.create_model(source.name, pretrained=True, num_classes=0)
        except (RuntimeError, OSError) as err:
            raise ModelError(f"vision: {name} cannot be loaded offline ({str(err).splitlines()[0]}).") from None
        return _timm_features(encoder, source.name, layer, drop_cls, image_size)
    return _hf(source, layer, drop_cls, image_size)


def _builtin(asset: str, layer: int, drop_cls: bool, image_size: int | None) -> tuple[VisionFeatures, Any]:
    import timm

    from visiontune.core.assets import efficientnet_lite0_state_dict

    if asset != "efficientnet-lite0":
        raise ModelError(f"vision: builtin:{asset} is not an image encoder; use builtin:efficientnet-lite0.")
    encoder = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    encoder.load_state_dict(efficientnet_lite0_state_dict())
    encoder.reset_classifier(0)
    return _timm_features(encoder, "tf_efficientnet_lite0", layer, drop_cls, image_size)


def _timm_features(encoder: nn.Module, arch: str, layer: int, drop_cls: bool, image_size: int | None):
    cfg = encoder.pretrained_cfg
    size = image_size or cfg.get("input_size", (3, 224, 224))[-1]
    if image_size:
        encoder.pretrained_cfg = {**cfg, "input_size": (3, size, size)}
    processor = TimmImageProcessor(
        size, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3), cfg.get("interpolation", "bicubic")
    )
    return VisionFeatures(encoder.eval(), "timm", layer, drop_cls, arch), processor


def _hf(source: ModelSource, layer: int, drop_cls: bool, image_size: int | None) -> tuple[VisionFeatures, Any]:
    from transformers import AutoImageProcessor, AutoModel

    name = source.name
    config = pretrained_config(name, "vision", source.text, "a local folder, timm:NAME or builtin:efficientnet-lite0")
    model = AutoModel.from_pretrained(name)
    encoder = _standalone_tower(model, config) if hasattr(config, "vision_config") else model
    if not hasattr(encoder.config, "patch_size"):
        raise ModelError(
            f"vision: {source.text} is a `{config.model_type}` model, not a CLIP/SigLIP-style vision encoder."
        )
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        raise ModelError(f"vision: {source.text} has no image processor (preprocessor_config.json); add one.") from None
    if image_size:
        raise ModelError("image_size is fixed by a transformers vision encoder's position embeddings; remove it.")
    return VisionFeatures(encoder.eval(), "hf", layer, drop_cls), processor


def _standalone_tower(model: nn.Module, config: Any) -> nn.Module:
    """CLIPVisionModel / SiglipVisionModel holding the dual encoder's vision weights (what LLaVA's tower is)."""
    from transformers import AutoModel

    if not hasattr(model, "vision_model"):
        raise ModelError(f"vision: a `{config.model_type}` model has no CLIP/SigLIP-style vision tower.")
    tower = AutoModel.from_config(config.vision_config)
    tower.load_state_dict(model.vision_model.state_dict())
    return tower


def load_vision(folder: Path, spec: dict[str, Any], preprocess: dict | None) -> tuple[VisionFeatures, Any]:
    """Rebuild the features module saved by `save_vision` (no pretrained source needed)."""
    if spec["source"] == "hf":
        from transformers import AutoImageProcessor, AutoModel

        encoder = AutoModel.from_pretrained(folder)
        return VisionFeatures(
            encoder.eval(), "hf", spec["layer"], spec["drop_cls"]
        ), AutoImageProcessor.from_pretrained(folder)
    import timm
    from safetensors.torch import load_file

    assert preprocess is not None
    encoder = timm.create_model(spec["arch"], pretrained=False, num_classes=0)
    encoder.load_state_dict(load_file(folder / "model.safetensors"))
    size = preprocess["image_size"]
    encoder.pretrained_cfg = {**encoder.pretrained_cfg, "input_size": (3, size, size)}
    processor = TimmImageProcessor(**preprocess)
    return VisionFeatures(encoder.eval(), "timm", spec["layer"], spec["drop_cls"], spec["arch"]), processor


def save_vision(vision: VisionFeatures, processor: Any, folder: Path) -> dict | None:
    """Write the encoder (and an HF image processor) to `folder`; return the timm preprocessing to record."""
    folder.mkdir(parents=True, exist_ok=True)
    if vision.source == "hf":
        vision.encoder.save_pretrained(folder)
        processor.save_pretrained(folder)
        return None
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vision.encoder.state_dict().items()}, folder / "model.safetensors")
    return processor.config
