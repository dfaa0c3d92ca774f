"""Tiny random-weight models and generated image sets, saved to local folders, so tests and smoke runs go through
the same loading path as real hub models — fully offline. `visiontune fixtures OUT_DIR` writes them all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

TINY_VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_timm_vit(out: Path, num_classes: int = 3) -> Path:
    """timm ViT (2 blocks, width 32) in timm's `save_for_hf` format: loads with `timm:local-dir:OUT` or `OUT`."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_VIT_ARGS)
    save_for_hf(model, str(out), model_args=TINY_VIT_ARGS, safe_serialization=True)
    _patch_input_size(out / "config.json", TINY_VIT_ARGS["img_size"])
    return out


def tiny_timm_cnn(out: Path, num_classes: int = 3) -> Path:
    """timm's own `test_efficientnet` (100k params) saved locally."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes)
    save_for_hf(model, str(out), safe_serialization=True)
    _patch_input_size(out / "config.json", 32)
    return out


def tiny_hf_vit(out: Path, num_classes: int = 3) -> Path:
    """transformers ViTForImageClassification + ViTImageProcessor at 32 px, saved with `save_pretrained`."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=num_classes)
    ViTForImageClassification(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """A learnable image-folder dataset: each class has its own colour and stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_sample(rng, c, size)).save(folder / f"{i:03d}.png")
    return root


def _sample(rng: np.random.Generator, c: int, size: int) -> np.ndarray:
    img = rng.integers(0, 60, (size, size, 3)).astype(np.int64)
    img[..., c % 3] += 150
    stripes = (np.arange(size) // 4) % 2 == 0
    if c % 2:
        img[stripes, :, :] += 40
    else:
        img[:, stripes, :] += 40
    return img.clip(0, 255).astype(np.uint8)


def _patch_input_size(config_file: Path, size: int) -> None:
    """Record the real input size in pretrained_cfg so preprocessing resolves to it."""
    config = json.loads(config_file.read_text())
    config.setdefault("pretrained_cfg", {})["input_size"] = [3, size, size]
    config_file.write_text(json.dumps(config, indent=2))


def write_all(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    return {
        "timm-vit": tiny_timm_vit(out / "timm-vit"),
        "timm-cnn": tiny_timm_cnn(out / "timm-cnn"),
        "hf-vit": tiny_hf_vit(out / "hf-vit"),
        "images": image_folder(out / "images"),
    }
