"""What kind of model a folder holds, for the commands that serve any model (`ask`, `demo`, model cards, ONNX):
the `kind` of its visiontune.json, or, for a folder visiontune did not write (a merged or LLaVA export, a plain
transformers / timm checkpoint), what its config.json says."""

from __future__ import annotations

import json
from pathlib import Path

from visiontune.core.manifest import read_manifest

DUAL_ENCODER_TYPES = ("clip", "siglip", "siglip2")


def model_kind(folder: Path) -> str:
    """classifier | dual_encoder | vlm | assembled_vlm | detector | segmenter | unknown."""
    folder = Path(folder)
    if kind := read_manifest(folder).get("kind"):
        return kind
    if (folder / "adapter_config.json").is_file():
        return "vlm"  # a PEFT adapter folder without a manifest: the only adapters `ask` loads are VLM ones
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    if not isinstance(config, dict):
        return "unknown"
    architectures = " ".join(config.get("architectures") or [])
    if config.get("model_type") in DUAL_ENCODER_TYPES:
        return "dual_encoder"
    if "ConditionalGeneration" in architectures or "ImageTextToText" in architectures:
        return "vlm"
    if "ObjectDetection" in architectures:
        return "detector"
    if "SemanticSegmentation" in architectures:
        return "segmenter"
    if "ImageClassification" in architectures or "architecture" in config:  # timm's config names `architecture`
        return "classifier"
    return "unknown"


# The task whose `evaluate` / `predict` serve a folder of each kind when no run recorded one (a plain checkpoint).
TASK_OF_KIND = {
    "classifier": "classify",
    "dual_encoder": "clip_classify",
    "vlm": "vlm_sft",
    "assembled_vlm": "vlm_assemble",
    "detector": "detect",
    "segmenter": "segment",
}


def task_for_folder(path: Path, default: str = "classify") -> str:
    """The task that loads the model in `path` (a model folder or a run folder's model/ or adapter/)."""
    from visiontune.core.sources import model_folder

    path = Path(path).expanduser()
    if not path.is_dir():
        return default
    folder = model_folder(path)
    if folder == path and (path / "adapter").is_dir():
        folder = path / "adapter"
    return TASK_OF_KIND.get(model_kind(folder), default)
