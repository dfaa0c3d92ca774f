"""A segmenter's export loads in the plain libraries and predicts the masks visiontune predicts: a decoder on a timm
backbone rebuilt by the README's lines (timm + torch, no visiontune), a transformers SegFormer through
AutoModelForSemanticSegmentation + AutoImageProcessor + post_process_semantic_segmentation, with the new classes in
`id2label`."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from tests.conftest import REPO, assert_same_predictions
from visiontune.segment.export import save_segmenter
from visiontune.segment.inference import image_logits
from visiontune.segment.model import build_segmenter
from visiontune.testing.segment_fixtures import CLASSES, write_segmentation_sets


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    folder = write_segmentation_sets(tmp_path_factory.mktemp("masks"))["ids"] / "images" / "train"
    return [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))[:3]]


def _readme_rebuild(folder, monkeypatch) -> dict:
    """Run the README's rebuild lines on `folder` with visiontune unimportable; returns their namespace."""
    text = (REPO / "README.md").read_text()
    code = text.split("<!-- segment-timm-rebuild -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('folder = "runs/mnist-fpn-lite0/model"', f"folder = {str(folder)!r}")
    monkeypatch.setitem(sys.modules, "visiontune", None)  # the lines must not need it
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def _ours(model, image) -> torch.Tensor:
    with torch.no_grad():
        (logits,) = image_logits(model, [pil_to_tensor(image).float() / 255], "resize", 2 / 3)
    return logits


@pytest.mark.parametrize("refine", [0, 8])
def test_timm_decoder_export_is_rebuilt_by_the_readme_lines(fixtures_dir, tmp_path, images, monkeypatch, refine):
    torch.manual_seed(0)
    model = build_segmenter(f"timm:local-dir:{fixtures_dir / 'timm-cnn'}", CLASSES, "fpn", 16, 48, refine=refine)
    assert (model.net.refine is not None) == bool(refine)
    save_segmenter(model, tmp_path / "model")
    ours = build_segmenter(str(tmp_path / "model"), None).eval()
    with monkeypatch.context() as m:
        scope = _readme_rebuild(tmp_path / "model", m)
    assert scope["spec"]["class_names"] == CLASSES
    for image in images:  # 64 x 48, 48 x 64, 80 x 60: each resized to the 48 px square and back
        pixels = pil_to_tensor(image).float() / 255
        side = scope["spec"]["image_size"]
        x = torch.nn.functional.interpolate(pixels[None], size=(side, side), mode="bilinear", antialias=True)
        with torch.no_grad():
            theirs = scope["model"]((x - scope["mean"]) / scope["std"])
        theirs = torch.nn.functional.interpolate(theirs, size=pixels.shape[-2:], mode="bilinear")[0]
        assert_same_predictions(_ours(ours, image).permute(1, 2, 0), theirs.permute(1, 2, 0), atol=1e-4)
        assert torch.equal(scope["segment"](pixels), _ours(ours, image).argmax(0))


def test_transformers_export_loads_with_the_new_classes_and_predicts_the_same_masks(fixtures_dir, tmp_path, images):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    torch.manual_seed(0)
    model = build_segmenter(str(fixtures_dir / "segformer"), ["road", "sky"], image_size=48)  # the fixture has 3
    model.spec |= {"inference": {"mode": "slide", "stride": 0.5}, "palette": {"road": [1, 2, 3], "sky": [4, 5, 6]}}
    save_segmenter(model, tmp_path / "model")
    plain = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "model").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    assert plain.config.id2label == {0: "road", 1: "sky"} and processor.size == {"height": 48, "width": 48}
    ours = build_segmenter(str(tmp_path / "model"), None).eval()
    assert ours.class_names == ["road", "sky"] and ours.image_size == 48
    assert ours.spec["inference"]["mode"] == "slide" and ours.spec["palette"]["sky"] == [4, 5, 6]  # for eval/predict
    square = images[0].resize((48, 48))  # at the training size both sides resize alike (not at all)
    with torch.no_grad():
        outputs = plain(**processor(images=square, return_tensors="pt"))
    theirs = torch.nn.functional.interpolate(outputs.logits, size=(48, 48), mode="bilinear")[0]
    assert_same_predictions(_ours(ours, square).permute(1, 2, 0), theirs.permute(1, 2, 0), atol=1e-4)
    mask = processor.post_process_semantic_segmentation(outputs, target_sizes=[(48, 48)])[0]
    assert (mask == _ours(ours, square).argmax(0)).float().mean() > 0.99  # a near-tie pixel may go either way
    for image in images:  # other sizes: PIL's resize and torch's differ a little, so nearly every pixel agrees
        with torch.no_grad():
            outputs = plain(**processor(images=image, return_tensors="pt"))
        mask = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
        assert (mask == _ours(ours, image).argmax(0)).float().mean() > 0.97
