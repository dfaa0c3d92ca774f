"""Exports of a trained detector, in forms the plain libraries load:

- transformers detector: a `save_pretrained` folder with the new classes in `id2label`, and an image processor that
  resizes as training did (longest side `image_size`), so `AutoModelForObjectDetection` + `AutoImageProcessor` +
  `post_process_object_detection` predict what visiontune predicts;
- torchvision detector: `model.safetensors` (the torchvision model's state dict) plus `visiontune.json`, which
  holds what rebuilds it with plain timm + torchvision (the README shows the lines; a test runs them).
"""

from __future__ import annotations

import copy
from pathlib import Path

from visiontune.core.manifest import save_with_manifest, write_manifest
from visiontune.detect.model import Detector


def save_detector(model: Detector, folder: Path) -> Path:
    if model.library == "torchvision":
        return save_with_manifest(folder, model.net, "detector", library="torchvision", **_labels(model), **model.spec)
    folder.mkdir(parents=True, exist_ok=True)
    net = merged(model)
    net.config.id2label = dict(enumerate(model.class_names))
    net.config.label2id = {name: i for i, name in enumerate(model.class_names)}
    net.save_pretrained(folder)
    export_processor(model.processor, model.image_size).save_pretrained(folder)
    write_manifest(folder, "detector", library="transformers", **_labels(model), **model.spec)
    return folder


def _labels(model: Detector) -> dict:
    return {"class_names": model.class_names, "category_ids": model.category_ids}


def merged(model: Detector):
    """The transformers model with LoRA folded into its weights (plain transformers loads it)."""
    from visiontune.classify.lora import merged_net

    model.net = merged_net(model.net)
    return model.net


def export_processor(processor, image_size: int):
    """The checkpoint's processor resizing as training did: the longest side to `image_size`, aspect kept."""
    exported = copy.deepcopy(processor)
    exported.size = {"max_height": image_size, "max_width": image_size}
    return exported
