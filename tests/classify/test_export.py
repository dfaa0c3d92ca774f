"""Exported classifiers predict in the plain library, with that library's own preprocessing, what visiontune
predicts: timm `local-dir:` + resolve_data_config/create_transform, transformers Auto* + AutoImageProcessor."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_same_predictions
from visiontune.classify.model import ImageClassifier
from visiontune.classify.resolve import resolve_classifier
from visiontune.core.transforms import Preprocess, eval_transform

NAMES = ["ant", "bee", "cow", "dog"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models of this module's own, seeded, so the logit tolerances hold run to run."""
    from visiontune.testing.fixtures import tiny_hf_vit, tiny_timm_cnn, tiny_timm_vit

    out = tmp_path_factory.mktemp("export-models")
    torch.manual_seed(0)
    return {
        name: make(out / name)
        for name, make in [("timm-cnn", tiny_timm_cnn), ("timm-vit", tiny_timm_vit), ("hf-vit", tiny_hf_vit)]
    }


def _images() -> list[Image.Image]:
    """Non-square images of other sizes, so resizing and cropping both matter. None hits the one case where the two
    libraries crop differently (margin 2k+1, k odd: transformers floors the offset to k, torchvision rounds to k+1)."""
    rng = np.random.default_rng(1)
    shapes = [(90, 40), (64, 64), (33, 100), (120, 96), (50, 77)]
    out = []
    for h, w in shapes:
        ramp = np.linspace(0, 200, w)[None, :, None] * np.ones((h, 1, 3))
        out.append(Image.fromarray((ramp + rng.integers(0, 55, (h, w, 3))).astype(np.uint8)))
    return out


def _trained(source: str, size: int) -> ImageClassifier:
    """A classifier at a non-native size and non-ImageNet statistics, after two SGD steps at that size."""
    torch.manual_seed(0)
    model = resolve_classifier(source, NAMES)
    model.preprocess = Preprocess(size, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), "bilinear")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        loss = model(torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3]))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def _visiontune_logits(folder) -> torch.Tensor:
    model = resolve_classifier(str(folder)).eval()
    transform = eval_transform(model.preprocess)
    return model(torch.stack([transform(im) for im in _images()]))["logits"]


@pytest.mark.random_model
@pytest.mark.parametrize(("kind", "size"), [("timm-cnn", 64), ("timm-vit", 48)])
def test_timm_export_predicts_the_same_in_plain_timm(kind, size, models, tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    _trained(str(models[kind]), size).save(tmp_path / "model")
    plain = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).eval()
    cfg = resolve_data_config({}, model=plain)
    assert cfg["input_size"] == (3, size, size) and cfg["crop_pct"] == 1.0
    assert tuple(cfg["mean"]) == (0.4, 0.5, 0.6) and cfg["interpolation"] == "bilinear"
    assert plain.pretrained_cfg["label_names"] == NAMES and plain.num_classes == len(NAMES)
    transform = create_transform(**cfg)
    with torch.no_grad():
        logits = plain(torch.stack([transform(im) for im in _images()]))
    assert_same_predictions(logits, _visiontune_logits(tmp_path / "model"), atol=1e-5)


@pytest.mark.random_model
@pytest.mark.parametrize("backend", [None, "pil"])
def test_transformers_export_at_another_size_predicts_the_same(backend, models, tmp_path):
    """The 32 px ViT trained at 48 px (interpolated position embeddings) exports as a native 48 px model."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    _trained(str(models["hf-vit"]), 48).save(tmp_path / "model")
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "model").eval()
    kwargs = {"backend": backend} if backend else {}
    processor = AutoImageProcessor.from_pretrained(tmp_path / "model", **kwargs)
    assert plain.config.image_size == 48 and plain.config.id2label == dict(enumerate(NAMES))
    assert plain.config.label2id == {n: i for i, n in enumerate(NAMES)}
    assert list(processor.image_mean) == [0.4, 0.5, 0.6] and list(processor.image_std) == [0.2, 0.3, 0.25]
    with torch.no_grad():
        logits = plain(**processor(_images(), return_tensors="pt")).logits
    # The default (torchvision) backend resizes tensors, not PIL images: pixels differ by up to 1/255.
    ours = _visiontune_logits(tmp_path / "model")
    assert_same_predictions(logits, ours, atol=1e-5 if backend else 1e-3)


@pytest.mark.parametrize(("backend", "atol"), [("pil", 1e-5), (None, 0.03)])
def test_transformers_processor_reproduces_eval_transform(backend, atol, tmp_path):
    from transformers import AutoImageProcessor

    from visiontune.classify.model import _image_processor

    pre = Preprocess(48, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), "bicubic")
    _image_processor(pre).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, **({"backend": backend} if backend else {}))
    images = _images()
    ours = torch.stack([eval_transform(pre)(im) for im in images])
    torch.testing.assert_close(processor(images, return_tensors="pt")["pixel_values"], ours, rtol=0, atol=atol)


def test_hf_vit_at_another_size_keeps_its_trained_function_after_export(models, tmp_path):
    """The live model (interpolating its 32 px table) and the exported 48 px model give the same logits."""
    model = _trained(str(models["hf-vit"]), 48)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = model(x)["logits"]
        model.save(tmp_path / "model")
        torch.testing.assert_close(resolve_classifier(str(tmp_path / "model")).eval()(x)["logits"], before)
        torch.testing.assert_close(model(x)["logits"], before)  # saving leaves the live model as it was
