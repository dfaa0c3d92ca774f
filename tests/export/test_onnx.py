"""`visiontune export --onnx`: the ONNX files run in onnxruntime and give what PyTorch gives (atol 1e-4 on logits and
embeddings of tiny fp32 models; measured differences are ~1e-7), with a dynamic batch, and preprocessing.json
describes the exact eval transform."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.export.test_card import run_card_code

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4


def _run_folder(tmp_path, model_dir):
    """A run folder as training leaves it, as far as export reads it: RUN/model/."""
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    return run


def _json_preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """preprocessing.json followed without visiontune or torch: what a user of the ONNX file writes."""
    edge, (height, width) = spec["resize"]["shortest_edge"], spec["center_crop"]
    short, long = sorted(image.size)
    resized = (edge, int(edge * long / short))  # the long edge rounds down (spec["resize"]["long_edge"])
    assert spec["resize"]["long_edge"] == "floor"
    size = resized if image.width <= image.height else resized[::-1]
    resample = Image.BICUBIC if spec["resize"]["interpolation"] == "bicubic" else Image.BILINEAR
    image = image.convert(spec["channels"]).resize(size, resample)
    left, top = int(round((image.width - width) / 2)), int(round((image.height - height) / 2))
    array = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32) * spec["rescale"]
    array = (array - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return array.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("fixture", ["timm-vit", "hf-vit"])  # timm and transformers
def test_classifier_onnx_matches_pytorch(cli, fixtures_dir, tmp_path, fixture, monkeypatch, capsys):
    from visiontune.classify.resolve import resolve_classifier
    from visiontune.core.transforms import eval_transform

    run = _run_folder(tmp_path, fixtures_dir / fixture)
    code, out, err = cli("export", run, "--onnx")
    assert code == 0, err
    folder = run / "onnx"
    info = json.loads((folder / "preprocessing.json").read_text())
    assert info["opset"] == 18 and info["kind"] == "classifier"
    clf = resolve_classifier(str(run)).eval()
    assert info["class_names"] == clf.class_names
    session = ort.InferenceSession(str(folder / info["files"]["model"]))
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic, not the example's 2
    pixels = torch.randn(3, *info["inputs"]["pixel_values"][1:], generator=torch.Generator().manual_seed(0))
    (logits,) = session.run(["logits"], {"pixel_values": pixels.numpy()})
    with torch.inference_mode():
        expected = clf(pixels)["logits"].numpy()
    np.testing.assert_allclose(logits, expected, atol=ATOL)
    # the JSON is enough to preprocess: a non-square photo gives visiontune's own eval tensor
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    ours = eval_transform(clf.preprocess)(photo).numpy()[None]
    np.testing.assert_allclose(_json_preprocess(photo, info["preprocess"]), ours, atol=1e-5)
    # the folder's model card: its onnxruntime + Pillow code gives visiontune's top probability for an image
    label, prob = run_card_code(folder / "README.md", monkeypatch, capsys)[-1].rsplit(" ", 1)
    with torch.inference_mode():
        probs = clf(eval_transform(clf.preprocess)(Image.open(run / "image.jpg"))[None])["logits"].softmax(-1)
    assert label in clf.class_names and float(prob) == pytest.approx(probs.max().item(), abs=1e-4)


@pytest.mark.parametrize("fixture", ["clip", "lite0-minilm"])  # transformers CLIP; the built-in dual encoder's class
def test_dual_encoder_towers_match_pytorch(cli, fixtures_dir, tmp_path, fixture):
    from transformers import AutoTokenizer

    from tests.conftest import fixture_seed
    from visiontune.clip.dual_encoder import image_features, resolve_dual_encoder, text_features
    from visiontune.testing.fixtures import tiny_lite0_minilm

    if fixture == "lite0-minilm":
        with fixture_seed():
            source = tiny_lite0_minilm(tmp_path / "lite0-minilm")
    else:
        source = fixtures_dir / fixture
    out = tmp_path / "onnx"
    code, _, err = cli("export", source, "--onnx", "--out", out)
    assert code == 0, err
    info = json.loads((out / "preprocessing.json").read_text())
    assert info["kind"] == "dual_encoder" and info["family"] == fixture and info["opset"] == 18
    enc = resolve_dual_encoder(str(source))
    enc.model.eval()  # the built-in class loads in training mode (BatchNorm on batch statistics); the export is eval
    pixels = torch.randn(3, *info["inputs"]["pixel_values"][1:], generator=torch.Generator().manual_seed(0))
    image = ort.InferenceSession(str(out / info["files"]["image"])).run(None, {"pixel_values": pixels.numpy()})[0]
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer written beside the towers
    texts = ["a photo of a cat", "dog", "a red car on a road"]  # three rows, unequal lengths
    tokens = tokenizer(
        texts,
        padding=info["text"]["padding"],
        truncation=True,
        max_length=info["text"]["max_length"],
        return_tensors="np",
    )
    feeds = {
        "input_ids": tokens["input_ids"].astype(np.int64),
        "attention_mask": tokens["attention_mask"].astype(np.int64),
    }
    text = ort.InferenceSession(str(out / info["files"]["text"])).run(None, feeds)[0]
    with torch.inference_mode():
        np.testing.assert_allclose(image, image_features(enc.model, pixels).numpy(), atol=ATOL)
        expected = text_features(enc.model, **{k: torch.from_numpy(v) for k, v in feeds.items()})
    np.testing.assert_allclose(text, expected.numpy(), atol=ATOL)
    assert info["logit_scale"] == pytest.approx(float(enc.logit_scale()))


def test_refusals_are_one_sentence(cli, fixtures_dir, tmp_path):
    code, _, err = cli("export", fixtures_dir / "timm-vit", "--onnx")  # a model folder: no RUN/onnx to default to
    assert code == 2 and "pass --out FOLDER" in err
    run = _run_folder(tmp_path, fixtures_dir / "detr")
    (run / "model" / "visiontune.json").write_text(json.dumps({"format": 1, "kind": "detector"}))
    code, _, err = cli("export", run, "--onnx")
    assert code == 2 and "classifiers and dual encoders" in err and "Traceback" not in err
    code, _, err = cli("export", run, "--onnx", "--merge")
    assert code == 2 and "separate exports" in err
