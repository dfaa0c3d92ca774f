"""`visiontune demo MODEL --space DIR`: a Hugging Face Space folder that runs without visiontune: app.py (Gradio +
the model's plain library: timm, transformers, PEFT), requirements.txt pinned to the versions verified here, the
model in model/, and a README.md with the Space metadata. `python app.py` in DIR serves it (127.0.0.1 unless
GRADIO_SERVER_NAME says otherwise, as the Space platform does)."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from visiontune.core.errors import ModelError
from visiontune.core.kinds import model_kind
from visiontune.core.manifest import read_manifest
from visiontune.demo.handlers import model_folder_of

MODEL_DIR = "model"


def write_space(model: str, out: Path) -> Path:
    folder = model_folder_of(model)
    kind, manifest = model_kind(folder), read_manifest(folder)
    library = _library(folder, kind, manifest)
    app = TEMPLATES.get((kind, library))
    if app is None:
        raise ModelError(
            f"{model} holds a {kind} ({library}); --space writes Spaces for timm / transformers classifiers, "
            "transformers CLIP / SigLIP dual encoders and transformers VLMs (full or a PEFT adapter on a Hub base "
            "model); serve this one with `visiontune demo`."
        )
    base = manifest.get("base_model") if library == "peft" else None
    if library == "peft" and (not base or Path(str(base)).expanduser().exists()):
        raise ModelError(f"{model} is an adapter on the local model {base}; a Space can only load a Hub base model.")
    shutil.copytree(folder, out / MODEL_DIR, dirs_exist_ok=True)
    (out / "app.py").write_text(app.replace("BASE_MODEL", str(base or "")), encoding="utf-8")
    (out / "requirements.txt").write_text("\n".join(_requirements(library)) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(model, kind, library), encoding="utf-8")
    return out


def _library(folder: Path, kind: str, manifest: dict) -> str:
    if kind == "classifier":
        if manifest.get("library") == "timm":
            return "timm"
        try:
            return "timm" if "architecture" in json.loads((folder / "config.json").read_text()) else "transformers"
        except (OSError, ValueError):
            return "transformers"
    if kind == "dual_encoder":
        return "pytorch" if manifest.get("family") == "lite0-minilm" else "transformers"
    if kind == "vlm":
        return "peft" if (folder / "adapter_config.json").is_file() else "transformers"
    return manifest.get("library") or "pytorch"


def _pin(package: str) -> str:
    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return package


def _requirements(library: str) -> list[str]:
    packages = ["gradio", "torch", "pillow"]
    packages += {
        "timm": ["timm", "torchvision"],
        "transformers": ["transformers", "torchvision"],
        "peft": ["transformers", "peft", "torchvision"],
    }[library]
    return [_pin(p) for p in packages]


def _readme(model: str, kind: str, library: str) -> str:
    from visiontune.export.card import PIPELINES

    try:
        sdk = version("gradio")
    except PackageNotFoundError:
        sdk = "6.31.0"
    name = Path(model).expanduser().resolve().name
    return f"""---
title: {name}
emoji: 🔎
colorFrom: blue
colorTo: green
sdk: gradio
sdk_version: {sdk}
app_file: app.py
pinned: false
license: other
tags:
- visiontune
- {PIPELINES.get(kind, "vision")}
---

# {name}

A demo of a model fine-tuned with visiontune (task `{PIPELINES.get(kind, "vision")}`, {library}). The model is in
`model/`; `app.py` loads it with {library} alone. Locally: `pip install -r requirements.txt && python app.py`.
"""


_HEADER = '''"""Gradio demo of the model in model/ (written by `visiontune demo --space`; needs no visiontune)."""

import os

import gradio as gr
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "model")
'''

_LAUNCH = """

if __name__ == "__main__":
    # 127.0.0.1 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise (a Space sets 0.0.0.0)
    demo.queue().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
"""

_CLASSIFY_UI = """

demo = gr.Interface(
    fn=classify,
    inputs=gr.Image(type="pil", label="Image"),
    outputs=gr.Label(num_top_classes=5, label="Top classes"),
    title="Image classifier",
    api_name="classify",
)
"""

TIMM_CLASSIFIER = (
    _HEADER
    + """import timm

model = timm.create_model("local-dir:" + MODEL, pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
labels = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]


def classify(image: Image.Image) -> dict:
    with torch.no_grad():
        probs = model(transform(image.convert("RGB"))[None]).softmax(-1)[0]
    return {label: float(p) for label, p in zip(labels, probs.tolist())}
"""
    + _CLASSIFY_UI
    + _LAUNCH
)

HF_CLASSIFIER = (
    _HEADER
    + """from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained(MODEL).eval()
processor = AutoImageProcessor.from_pretrained(MODEL, backend="pil")  # resizes as training did


def classify(image: Image.Image) -> dict:
    with torch.no_grad():
        probs = model(**processor(images=image.convert("RGB"), return_tensors="pt")).logits.softmax(-1)[0]
    return {model.config.id2label[i]: float(p) for i, p in enumerate(probs.tolist())}
"""
    + _CLASSIFY_UI
    + _LAUNCH
)

HF_DUAL_ENCODER = (
    _HEADER
    + """from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

model = AutoModel.from_pretrained(MODEL).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL)
processor = AutoImageProcessor.from_pretrained(MODEL)


def zero_shot(image: Image.Image, labels: str) -> dict:
    names = [label.strip() for label in labels.split(",") if label.strip()]
    if not names:
        raise gr.Error("Type the labels to choose from, separated by commas.")
    texts = [f"a photo of a {name}." for name in names]
    with torch.no_grad():
        out = model(
            **tokenizer(texts, padding=True, return_tensors="pt"),
            **processor(images=image.convert("RGB"), return_tensors="pt"),
        )
    return dict(zip(names, out.logits_per_image.softmax(-1)[0].tolist()))


demo = gr.Interface(
    fn=zero_shot,
    inputs=[gr.Image(type="pil", label="Image"), gr.Textbox(label="Labels (comma-separated)", value="cat, dog")],
    outputs=gr.Label(num_top_classes=5, label="Zero-shot"),
    title="Zero-shot image classification",
    api_name="zero_shot",
)
"""
    + _LAUNCH
)

_VLM_BODY = """from threading import Thread

from transformers import TextIteratorStreamer


def ask(image: Image.Image, question: str):
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [image.convert("RGB")] if image is not None else None
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=256, do_sample=False, streamer=streamer)
    Thread(target=model.generate, kwargs=kwargs, daemon=True).start()
    text = ""
    for piece in streamer:
        text += piece
        yield text


demo = gr.Interface(
    fn=ask,
    inputs=[gr.Image(type="pil", label="Image"), gr.Textbox(label="Question", value="Describe the image.")],
    outputs=gr.Textbox(label="Answer", lines=6),
    title="Ask about an image",
    api_name="ask",
)
"""

HF_VLM = (
    _HEADER
    + """from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(MODEL).eval()
processor = AutoProcessor.from_pretrained(MODEL)
"""
    + _VLM_BODY
    + _LAUNCH
)

PEFT_VLM = (
    _HEADER
    + """from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("BASE_MODEL"), MODEL).eval()
processor = AutoProcessor.from_pretrained(MODEL)
"""
    + _VLM_BODY
    + _LAUNCH
)

TEMPLATES = {
    ("classifier", "timm"): TIMM_CLASSIFIER,
    ("classifier", "transformers"): HF_CLASSIFIER,
    ("dual_encoder", "transformers"): HF_DUAL_ENCODER,
    ("vlm", "transformers"): HF_VLM,
    ("vlm", "peft"): PEFT_VLM,
}
