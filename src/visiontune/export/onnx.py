"""`visiontune export RUN --onnx`: a saved classifier, or a dual encoder's image and text towers, as ONNX files
with a dynamic batch axis, plus `preprocessing.json` (size, mean, std, resize mode, opset) beside them, so a runtime
without torch (onnxruntime) predicts what visiontune predicts.

torch.onnx.export (the torch.export-based exporter, onnxscript behind it) does the conversion; own code here is only
the small wrappers that give each graph plain tensor inputs and outputs, and the JSON that records the preprocessing.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune.core.errors import ModelError
from visiontune.core.kinds import model_kind
from visiontune.core.sources import model_folder

OPSET = 18  # onnxruntime 1.31 runs it; the exporter's own default
PREPROCESSING = "preprocessing.json"
CLASSIFIER, IMAGE_TOWER, TEXT_TOWER = "model.onnx", "image_encoder.onnx", "text_encoder.onnx"
SIMPLE_KINDS = ("classifier", "dual_encoder")


class _Logits(nn.Module):
    """ImageClassifier returns a dict; an ONNX graph gets the logits tensor alone."""

    def __init__(self, clf: nn.Module):
        super().__init__()
        self.clf = clf

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clf(pixel_values)["logits"]


class _ImageTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from visiontune.clip.dual_encoder import image_features

        return image_features(self.model, pixel_values)


class _TextTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from visiontune.clip.dual_encoder import text_features

        return text_features(self.model, input_ids=input_ids, attention_mask=attention_mask)


def default_onnx_dir(model: str) -> Path:
    """RUN/onnx for a run folder; a model folder has no run folder to hold it, so --out must name one."""
    path = Path(model).expanduser()
    if (path / "model").is_dir() and model_folder(path) != path:
        return path / "onnx"
    raise ModelError(f"{model} is not a run folder, so there is no RUN/onnx to write; pass --out FOLDER.")


def export_onnx(model: str, out: Path, opset: int = OPSET) -> dict[str, Any]:
    """Write the ONNX file(s) and preprocessing.json into `out` (an empty or previous export folder); returns the
    JSON written."""
    folder = model_folder(Path(model).expanduser())
    kind = model_kind(folder)
    kind = "classifier" if kind == "unknown" else kind  # resolve_classifier names what it cannot load
    if kind not in SIMPLE_KINDS:
        raise ModelError(
            f"{model} holds a `{kind}` model; --onnx exports classifiers and dual encoders (CLIP) only so far."
        )
    out.mkdir(parents=True, exist_ok=True)
    if kind == "classifier":
        info = _export_classifier(str(folder), out, opset)
    else:
        info = _export_dual_encoder(str(folder), out, opset)
    (out / PREPROCESSING).write_text(json.dumps(info, indent=2))
    return info


def _export_classifier(folder: str, out: Path, opset: int) -> dict[str, Any]:
    from visiontune.classify.resolve import resolve_classifier

    clf = resolve_classifier(folder).eval()
    size = clf.preprocess.image_size
    example = torch.zeros(2, len(clf.preprocess.mean), size, size)
    _export(_Logits(clf), (example,), out / CLASSIFIER, ["pixel_values"], ["logits"], opset)
    return {
        "kind": "classifier",
        "files": {"model": CLASSIFIER},
        "opset": opset,
        "inputs": {"pixel_values": ["batch", len(clf.preprocess.mean), size, size]},
        "outputs": {"logits": ["batch", len(clf.class_names)]},
        "class_names": clf.class_names,
        "preprocess": _preprocess_json(clf.preprocess),
    }


def _export_dual_encoder(folder: str, out: Path, opset: int) -> dict[str, Any]:
    from visiontune.clip.dual_encoder import max_text_length, resolve_dual_encoder

    enc = resolve_dual_encoder(folder)
    model = enc.model.eval()
    pre = enc.preprocess
    pixels = torch.zeros(2, len(pre.mean), pre.image_size, pre.image_size)
    _export(_ImageTower(model), (pixels,), out / IMAGE_TOWER, ["pixel_values"], ["image_embeds"], opset)
    tokens = enc.tokenize(["a photo of a cat", "a photo"])  # two lengths: the padding is exercised
    text_inputs = (tokens["input_ids"], tokens.get("attention_mask", torch.ones_like(tokens["input_ids"])))
    _export(_TextTower(model), text_inputs, out / TEXT_TOWER, ["input_ids", "attention_mask"], ["text_embeds"], opset)
    enc.tokenizer.save_pretrained(out)  # the text tower's ids come from this tokenizer
    extra = {k: enc.meta[k] for k in ("class_names", "templates") if k in enc.meta}
    return {
        "kind": "dual_encoder",
        "family": enc.family,
        "files": {"image": IMAGE_TOWER, "text": TEXT_TOWER, "tokenizer": "tokenizer.json"},
        "opset": opset,
        "inputs": {
            "pixel_values": ["batch", len(pre.mean), pre.image_size, pre.image_size],
            "input_ids": ["batch", "sequence"],
            "attention_mask": ["batch", "sequence"],
        },
        "outputs": {"image_embeds": ["batch", "dim"], "text_embeds": ["batch", "dim"]},
        # Embeddings are unnormalised: L2-normalise both, logits = logit_scale * image @ text.T (as CLIP does).
        "logit_scale": float(enc.logit_scale()),
        "text": {"padding": _padding(enc.family), "max_length": max_text_length(model, enc.tokenizer)},
        "preprocess": _preprocess_json(pre),
        **extra,
    }


def _padding(family: str) -> str:
    from visiontune.clip.dual_encoder import FAMILIES

    return FAMILIES[family]


def _preprocess_json(pre) -> dict[str, Any]:
    """What `core.transforms.eval_transform` does, in words a non-Python runtime can follow."""
    return {
        # torchvision's Resize(int): the short edge becomes the size, the long one floor(long * size / short)
        "resize": {"shortest_edge": pre.image_size, "long_edge": "floor", "interpolation": pre.interpolation},
        "center_crop": [pre.image_size, pre.image_size],
        "rescale": 1 / 255,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "channels": "RGB",
        "layout": "NCHW",
    }


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], opset: int) -> None:
    """torch.export-based ONNX export; every input's dim 0 (and a text input's dim 1) is dynamic."""
    batch = torch.export.Dim("batch")
    shapes = {
        name: {0: batch, 1: torch.export.Dim("sequence")} if name in ("input_ids", "attention_mask") else {0: batch}
        for name in inputs
    }
    module = module.eval()  # a fresh wrapper starts in training mode
    forward_names = list(module.forward.__code__.co_varnames[1 : 1 + len(inputs)])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress steps
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                opset_version=opset,
                dynamic_shapes=dict(zip(forward_names, shapes.values(), strict=True)),
                external_data=False,
            )
    except Exception as err:  # noqa: BLE001 - the exporter's errors are long; one sentence names what failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"ONNX export of {path.name} failed: {first[:300]}") from err
    program.save(str(path))
