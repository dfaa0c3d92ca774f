"""A detector's export loads in the plain libraries and predicts what visiontune predicts: a torchvision detector
rebuilt by the README's lines (timm + torchvision only), a transformers detector through AutoModelForObjectDetection
+ AutoImageProcessor + post_process_object_detection, with the new classes in `id2label`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from tests.conftest import REPO
from visiontune.core.manifest import read_manifest
from visiontune.detect.export import save_detector
from visiontune.detect.model import build_detector
from visiontune.detect.task import detect_image
from visiontune.testing.detect_fixtures import CLASSES, write_detection_sets


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = write_detection_sets(tmp_path_factory.mktemp("boxes"))["coco-train"].parent / "images"
    return sorted(folder.glob("*.png"))


def _readme_rebuild(folder) -> dict:
    """Run the README's rebuild lines on `folder`; returns their namespace."""
    text = (REPO / "README.md").read_text()
    code = text.split("<!-- detect-torchvision-rebuild -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('folder = "runs/mnist-fcos-lite0/model"', f"folder = {str(folder)!r}")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def _by_score(found: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = found["scores"].argsort(descending=True)
    return found["boxes"][order], found["scores"][order], found["labels"][order]


def test_torchvision_export_is_rebuilt_by_the_readme_lines(fixtures_dir, tmp_path, images):
    torch.manual_seed(0)
    model = build_detector(f"timm:local-dir:{fixtures_dir / 'timm-cnn'}", CLASSES, "fcos", 32, 64)
    model.category_ids = [3, 7, 11]
    save_detector(model, tmp_path / "model")
    assert read_manifest(tmp_path / "model")["category_ids"] == [3, 7, 11]
    scope = _readme_rebuild(tmp_path / "model")
    assert scope["names"] == CLASSES
    plain = scope["model"]
    plain.score_thresh = 0.05
    ours = build_detector(str(tmp_path / "model"), None).eval()
    ours.configure(conf=0.05, iou=None, max_detections=100)
    image = Image.open(images[0]).convert("RGB")  # 64 x 48: the training size, so both resize alike
    with torch.no_grad():
        theirs = plain([pil_to_tensor(image).float() / 255])[0]
    mine = detect_image(ours, image)
    assert len(theirs["scores"]) > 0
    for a, b in zip(_by_score(mine), _by_score(theirs), strict=True):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=0, atol=1e-4)


def test_transformers_export_loads_with_the_new_classes_and_predicts_the_same(fixtures_dir, tmp_path, images):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    torch.manual_seed(0)
    model = build_detector(str(fixtures_dir / "detr"), ["cat", "dog"], image_size=64)  # the fixture has 3 classes
    save_detector(model, tmp_path / "model")
    plain = AutoModelForObjectDetection.from_pretrained(tmp_path / "model").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    assert plain.config.id2label == {0: "cat", 1: "dog"}
    ours = build_detector(str(tmp_path / "model"), None).eval()
    ours.configure(conf=0.0, iou=None, max_detections=100)
    assert ours.class_names == ["cat", "dog"] and ours.image_size == 64
    for path in (images[0], images[2]):  # 64 x 48 as trained, and 80 x 60 resized to it
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            outputs = plain(**processor(images=image, return_tensors="pt"))
        size = [(image.height, image.width)]
        theirs = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=size)[0]
        mine = detect_image(ours, image)
        boxes, scores, labels = _by_score(theirs)
        torch.testing.assert_close(_by_score(mine)[1], scores, rtol=0, atol=2e-3)
        torch.testing.assert_close(_by_score(mine)[0], boxes, rtol=0, atol=0.5)
