"""Exports of a trained segmenter, in forms the plain libraries load:

- transformers model: a `save_pretrained` folder with the classes in `id2label` and an image processor that resizes
  to the training square, so `AutoModelForSemanticSegmentation` (Mask2Former / MaskFormer:
  `AutoModelForUniversalSegmentation`) + `AutoImageProcessor` + `post_process_semantic_segmentation` predict the
  masks visiontune predicts (eval.mode: resize);
- decoder on a timm backbone: `model.safetensors` (the decoder's state dict) plus `visiontune.json`, which holds
  what rebuilds it with timm and segment/decoders.py (a file of plain torch; the README shows the lines).
"""

from __future__ import annotations

import copy
from pathlib import Path

from visiontune.core.manifest import save_with_manifest, write_manifest
from visiontune.segment.model import KIND, Segmenter


def save_segmenter(model: Segmenter, folder: Path) -> Path:
    fields = {"class_names": model.class_names, **model.spec}
    if model.library == "timm":
        return save_with_manifest(folder, model.net, KIND, library="timm", **fields)
    from visiontune.classify.lora import merged_net

    folder.mkdir(parents=True, exist_ok=True)
    model.net = net = merged_net(model.net)
    net.config.id2label = dict(enumerate(model.class_names))
    net.config.label2id = {name: i for i, name in enumerate(model.class_names)}
    net.config.semantic_loss_ignore_index = model.ignore_index
    net.save_pretrained(folder)
    export_processor(model).save_pretrained(folder)
    write_manifest(folder, KIND, library="transformers", **fields)
    return folder


def export_processor(model: Segmenter):
    """The checkpoint's processor resizing to the training square, with the normalisation training used; its
    `do_reduce_labels` as the recipe read the masks (for whoever trains on with raw masks)."""
    processor = copy.deepcopy(model.processor)
    processor.size = {"height": model.image_size, "width": model.image_size}
    processor.image_mean, processor.image_std = list(model.spec["image_mean"]), list(model.spec["image_std"])
    if hasattr(processor, "do_reduce_labels"):
        processor.do_reduce_labels = bool(model.spec.get("reduce_labels", False))
    if hasattr(processor, "ignore_index"):  # Mask2Former / MaskFormer: the label left out of the binary masks
        processor.ignore_index = model.ignore_index
    return processor
