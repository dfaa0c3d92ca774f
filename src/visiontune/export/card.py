"""Model cards: the README.md of an exported model folder, in the Hub's format (YAML metadata + markdown).

Metadata (base_model, datasets, library_name, pipeline_tag, license, tags, model-index from the run's
eval/after.json) goes through huggingface_hub's `ModelCardData`, which writes the Hub's schema. Own code here is what
it lacks: reading a visiontune run (config.yaml, eval/after.json, the folder's visiontune.json) and the loading code
for each kind of folder, which `tests/export/test_card.py` extracts and runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from visiontune.core.kinds import model_kind
from visiontune.core.manifest import read_manifest

CARD = "README.md"
LICENSE = "other"  # a fine-tune inherits its base model's licence, which the run does not record
PIPELINES = {
    "classifier": "image-classification",
    "dual_encoder": "zero-shot-image-classification",
    "vlm": "image-text-to-text",
    "assembled_vlm": "image-text-to-text",
    "detector": "object-detection",
    "segmenter": "image-segmentation",
}
EXPORT_FOLDERS = ("model", "adapter", "merged", "llava", "onnx")  # a run's folders that can hold a model


def write_run_cards(run_dir: Path) -> list[Path]:
    """A card in every model folder of a finished run (its model/ or adapter/ and any export beside them)."""
    written = []
    for name in EXPORT_FOLDERS:
        folder = Path(run_dir) / name
        if (folder / "visiontune.json").is_file() or (folder / "preprocessing.json").is_file():
            written.append(write_model_card(folder, run_dir))
    return written


def run_of(folder: Path) -> Path | None:
    """The run folder an exported model folder sits in (RUN/model, RUN/onnx...), if any."""
    parent = Path(folder).resolve().parent
    return parent if (parent / "config.yaml").is_file() else None


def write_model_card(folder: Path, run_dir: Path | None = None, repo_id: str | None = None) -> Path:
    """Write `folder`/README.md; `repo_id` makes the loading code load from the Hub instead of the local folder."""
    path = Path(folder) / CARD
    path.write_text(model_card(folder, run_dir, repo_id), encoding="utf-8")
    return path


def model_card(folder: Path, run_dir: Path | None = None, repo_id: str | None = None) -> str:
    """The card's text (YAML metadata + markdown) for the model in `folder`, from its run when there is one."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    run_dir = run_dir if run_dir is not None else run_of(folder)
    recipe = _recipe(run_dir)
    info = _describe(folder, recipe)
    source = repo_id or folder.name  # the loading code runs from the folder's parent, or from the Hub
    name = repo_id or (Path(run_dir).resolve().name if run_dir else folder.resolve().name)
    data = _card_data(info, recipe, _metrics(run_dir), name)
    body = _body(info, recipe, run_dir, _loading_code(info, source, hub=repo_id is not None), name)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


# ---- what the folder holds


def _describe(folder: Path, recipe: dict) -> dict[str, Any]:
    """kind, library and the fields the loading code needs, from visiontune.json (or preprocessing.json: ONNX)."""
    onnx = folder / "preprocessing.json"
    if onnx.is_file():
        spec = json.loads(onnx.read_text())
        return {"kind": spec["kind"], "library": "onnx", "onnx": spec}
    manifest = read_manifest(folder)
    kind = model_kind(folder)
    kind = "classifier" if kind == "unknown" else kind
    library = manifest.get("library") or ("timm" if _timm_config(folder) else "transformers")
    if kind == "classifier":
        library = "timm" if library == "timm" else "transformers"
    elif kind == "dual_encoder":
        library = "pytorch" if manifest.get("family") == "lite0-minilm" else "transformers"
    elif kind == "vlm":
        library = "peft" if (folder / "adapter_config.json").is_file() else "transformers"
    elif kind == "assembled_vlm":
        library = "pytorch"
    elif library == "torchvision":
        library = "pytorch"
    return {**manifest, "kind": kind, "library": library}


def _timm_config(folder: Path) -> bool:
    """timm's `save_for_hf` config.json names an `architecture` (transformers' names `architectures`)."""
    try:
        return "architecture" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _recipe(run_dir: Path | None) -> dict:
    import yaml

    path = Path(run_dir) / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _metrics(run_dir: Path | None) -> dict[str, float]:
    path = Path(run_dir) / "eval" / "after.json" if run_dir else None
    if path is None or not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("metrics", {})
    # NaN and COCO's -1 ("no object of that size to measure") say nothing about the model: left out
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v and v != -1}


def _hub_id(text: Any) -> str | None:
    """`text` when it can only be a Hub repo id (owner/name), not a path, builtin: or timm: source."""
    if not isinstance(text, str) or ":" in text or text.startswith((".", "/", "~")) or Path(text).exists():
        return None
    return text if re.fullmatch(r"[\w.-]+/[\w.-]+", text) else None


def _base(info: dict, recipe: dict) -> Any:
    return recipe.get("model") or info.get("base_model") or recipe.get("language") or recipe.get("init_from")


# ---- metadata


def _card_data(info: dict, recipe: dict, metrics: dict[str, float], name: str):
    from huggingface_hub import EvalResult, ModelCardData

    pipeline = PIPELINES.get(info["kind"], "image-classification")
    data = recipe.get("data") or {}
    train, val = data.get("train"), data.get("val")
    dataset_id = _hub_id(val) or _hub_id(train)
    results = [
        EvalResult(
            task_type=pipeline,
            dataset_type=dataset_id or "custom",
            dataset_name=str(val or train or "validation split"),
            dataset_split="validation" if not val else None,
            metric_type=key,
            metric_value=value,
        )
        for key, value in metrics.items()
    ]
    tags = ["visiontune", *(t for t in (recipe.get("task"), info["kind"], _tune(recipe)) if t)]
    if info["library"] == "onnx":
        tags.append("onnx")
    return ModelCardData(
        model_name=name,
        base_model=_hub_id(_base(info, recipe)),
        datasets=[d for d in {_hub_id(train), _hub_id(val)} if d] or None,
        library_name=info["library"],
        pipeline_tag=pipeline,
        license=LICENSE,
        tags=list(dict.fromkeys(tags)),
        eval_results=results or None,
    )


def _tune(recipe: dict) -> str | None:
    tune = recipe.get("tune")
    return tune.get("method") if isinstance(tune, dict) else None


# ---- markdown


def _body(info: dict, recipe: dict, run_dir: Path | None, code: str, name: str) -> str:
    import yaml

    base = _base(info, recipe)
    lines = [f"# {name}", ""]
    lines += [
        f"A model for `{PIPELINES.get(info['kind'], 'vision')}`"
        + (f" fine-tuned from `{base}`" if base else "")
        + " with [visiontune](https://pypi.org/project/visiontune/)"
        + (f" (`task: {recipe['task']}`)." if recipe.get("task") else "."),
        "",
        f"License: `{LICENSE}` until you set the base model's licence in this card's metadata.",
        "",
    ]
    if names := info.get("class_names") or (info.get("onnx") or {}).get("class_names"):
        lines += [f"Classes ({len(names)}): {', '.join(map(str, names[:50]))}{' ...' if len(names) > 50 else ''}", ""]
    metrics = _metrics(run_dir)
    if metrics:
        lines += [
            "## Results",
            "",
            "Validation after training (`eval/after.json`):",
            "",
            "| metric | value |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()] + [""]
    if recipe:
        lines += [
            "## How it was trained",
            "",
            "The resolved recipe (`config.yaml` of the run); `visiontune train config.yaml` trains it again:",
            "",
            "```yaml",
            yaml.safe_dump(recipe, sort_keys=False).rstrip(),
            "```",
            "",
        ]
    lines += ["## How to use", "", code.rstrip(), ""]
    return "\n".join(lines)


def _loading_code(info: dict, source: str, hub: bool) -> str:
    """Markdown with one ```python block that loads the folder with its plain library and predicts on image.jpg."""
    kind, library = info["kind"], info["library"]
    if library == "onnx":
        return _onnx_code(info["onnx"], source, hub)
    if kind == "classifier" and library == "timm":
        ref = f"hf-hub:{source}" if hub else f"local-dir:{source}"
        return _block(
            "With plain timm (the folder carries the training preprocessing and the class names):",
            f"""import timm
import torch
from PIL import Image

model = timm.create_model("{ref}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
image = Image.open("image.jpg").convert("RGB")  # your image
with torch.no_grad():
    probs = model(transform(image)[None]).softmax(-1)[0]
top = probs.argmax().item()
print(model.pretrained_cfg["label_names"][top], round(probs[top].item(), 4))""",
        )
    if kind == "classifier":
        return _block(
            "With plain transformers:",
            f"""import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{source}").eval()
processor = AutoImageProcessor.from_pretrained("{source}", backend="pil")  # resizes as training did
image = Image.open("image.jpg").convert("RGB")  # your image
with torch.no_grad():
    probs = model(**processor(images=image, return_tensors="pt")).logits.softmax(-1)[0]
top = probs.argmax().item()
print(model.config.id2label[top], round(probs[top].item(), 4))""",
        )
    if kind == "dual_encoder" and library == "transformers":
        labels = info.get("class_names") or ["cat", "dog"]
        template = (info.get("templates") or ["a photo of a {}."])[0]
        return _block(
            "Zero-shot classification with plain transformers (type any labels):",
            f"""import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{source}").eval()
tokenizer = AutoTokenizer.from_pretrained("{source}")
processor = AutoImageProcessor.from_pretrained("{source}")
labels = {labels!r}
texts = [{template!r}.format(label) for label in labels]
image = Image.open("image.jpg").convert("RGB")  # your image
with torch.no_grad():
    out = model(**tokenizer(texts, padding=True, return_tensors="pt"), **processor(images=image, return_tensors="pt"))
probs = out.logits_per_image.softmax(-1)[0]
top = probs.argmax().item()
print(labels[top], round(probs[top].item(), 4))""",
        )
    if kind == "vlm" and library == "peft":
        base = info.get("base_model", "BASE_MODEL")
        return _block(
            f"A PEFT adapter on `{base}`, with plain transformers + PEFT:",
            f"""import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{base}"), "{source}").eval()
processor = AutoProcessor.from_pretrained("{source}")
image = Image.open("image.jpg").convert("RGB")  # your image
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=[image], return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))""",
        )
    if kind == "vlm" or (kind in ("detector", "segmenter") and library == "transformers"):
        auto = {
            "vlm": "AutoModelForImageTextToText",
            "detector": "AutoModelForObjectDetection",
            "segmenter": "AutoModelForSemanticSegmentation",
        }[kind]
        return _block(
            "With plain transformers:",
            f"""from transformers import AutoProcessor, {auto}

model = {auto}.from_pretrained("{source}").eval()
processor = AutoProcessor.from_pretrained("{source}")""",
        )
    return _block(
        "This folder is rebuilt from its `visiontune.json` (see visiontune's README for the plain-library lines); "
        "with visiontune:",
        f"# visiontune predict {source} image.jpg\n# visiontune demo {source}",
    )


def _onnx_code(spec: dict, source: str, hub: bool) -> str:
    prefix = (
        "" if not hub else f'from huggingface_hub import snapshot_download\n\nfolder = snapshot_download("{source}")\n'
    )
    folder = "folder" if hub else repr(source)
    if spec["kind"] != "classifier":
        return _block(
            "The image and text towers run in onnxruntime; `preprocessing.json` gives the image preprocessing, "
            "the tokenizer and text padding, and `logit_scale`.",
            f"""{prefix}import os

import onnxruntime as ort

image_tower = ort.InferenceSession(os.path.join({folder}, "{spec["files"]["image"]}"))
text_tower = ort.InferenceSession(os.path.join({folder}, "{spec["files"]["text"]}"))""",
        )
    return _block(
        "With onnxruntime, numpy and Pillow only (the preprocessing as `preprocessing.json` states it):",
        f"""{prefix}import json
import os

import numpy as np
import onnxruntime as ort
from PIL import Image

spec = json.load(open(os.path.join({folder}, "preprocessing.json")))
pre = spec["preprocess"]
image = Image.open("image.jpg").convert("RGB")  # your image
edge, (height, width) = pre["resize"]["shortest_edge"], pre["center_crop"]
short, long = sorted(image.size)
size = (edge, int(edge * long / short))  # the long edge rounds down
size = size if image.width <= image.height else size[::-1]
resample = Image.BICUBIC if pre["resize"]["interpolation"] == "bicubic" else Image.BILINEAR
image = image.resize(size, resample)
left, top = int(round((image.width - width) / 2)), int(round((image.height - height) / 2))
x = np.asarray(image.crop((left, top, left + width, top + height)), np.float32) * pre["rescale"]
x = ((x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)).transpose(2, 0, 1)[None]
session = ort.InferenceSession(os.path.join({folder}, spec["files"]["model"]))
logits = session.run(None, {{"pixel_values": x}})[0][0]
probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
print(spec["class_names"][int(probs.argmax())], round(float(probs.max()), 4))""",
    )


def _block(intro: str, code: str) -> str:
    return f"{intro}\n\n```python\n{code}\n```\n"


def code_blocks(card: str) -> list[str]:
    """The ```python blocks of a card (tests run them)."""
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)
