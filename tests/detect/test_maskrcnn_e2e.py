"""`detector: maskrcnn` end to end on the tiny timm CNN and the generated COCO set with polygons and RLE: a training
step learns from the masks, CLI train -> eval -> predict (PNG instance masks, overlays, COCO results with
segmentation), the export reloads to the same boxes and masks, box-only data stops before a run folder exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.detect.conftest import detect_recipe
from visiontune.detect.config import DETECTION_METRICS, MASK_METRICS
from visiontune.detect.masks import decoded
from visiontune.testing.detect_fixtures import CLASSES, COCO_IDS, write_detection_sets


def _maskrcnn(fixtures_dir: Path):
    from visiontune.detect.model import build_detector

    torch.manual_seed(0)
    return build_detector(f"timm:local-dir:{fixtures_dir / 'timm-cnn'}", CLASSES, "maskrcnn", 32, 64)


def test_a_training_step_learns_from_the_masks(fixtures_dir, instance_sets, monkeypatch):
    """The collated masks reach torchvision's Mask R-CNN (crowd objects left out, as for boxes) and give its mask
    loss a gradient on the mask head."""
    from torchvision.models.detection import roi_heads

    from visiontune.detect.data import read_boxes
    from visiontune.detect.dataset import DetectionDataset
    from visiontune.detect.task import DetectionCollator
    from visiontune.detect.transforms import detection_transforms

    data = read_boxes(str(instance_sets["coco-train"]), masks=True)
    dataset = DetectionDataset(data, detection_transforms("none", 64, train=False), 10**8)
    batch = DetectionCollator()([dataset[i] for i in range(4)])
    seen = []
    original = roi_heads.maskrcnn_loss
    monkeypatch.setattr(roi_heads, "maskrcnn_loss", lambda *a: seen.append(a[2]) or original(*a))
    model = _maskrcnn(fixtures_dir).train()
    out = model(**batch)
    assert "loss_mask" in out and torch.isfinite(out["loss"])
    objects = [int((~t["iscrowd"]).sum()) for t in batch["targets"]]
    assert [len(m) for m in seen[0]] == objects  # image 0's crowd region is not trained as an object
    out["loss"].backward()
    head = model.net.roi_heads.mask_predictor.mask_fcn_logits.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


@pytest.mark.random_model  # reads what a random tiny model predicts (how many masks, their pixels)
def test_cli_train_eval_predict(fixtures_dir, instance_sets, write_recipe, cli, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli(
        "train",
        write_recipe(
            detect_recipe(fixtures_dir, instance_sets, run, detector="maskrcnn", train={"metric": "mask_map_50"})
        ),
    )
    assert code == 0, err
    after = json.loads((run / "eval" / "after.json").read_text())
    assert set(after["metrics"]) == {*DETECTION_METRICS, *MASK_METRICS}
    assert [c["label"] for c in after["per_class_ap"]] == CLASSES and "mask_ap" in after["per_class_ap"][0]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_mask_map_50" in row for row in logged)  # what train.metric selects the best checkpoint by
    report = (run / "report.md").read_text()
    assert "mask AP" in report and "mask mAP@.5" in report and (run / "plots" / "detections.png").is_file()
    manifest = json.loads((run / "model" / "visiontune.json").read_text())
    assert manifest["detector"] == "maskrcnn" and manifest["category_ids"] == COCO_IDS
    results = json.loads((run / "eval" / "predictions.json").read_text())
    val = {e["id"] - 100: e for e in json.loads(instance_sets["coco-val"].read_text())["images"]}  # image_id: position
    for r in results:
        entry = list(val.values())[r["image_id"]]
        assert r["segmentation"]["size"] == [entry["height"], entry["width"]]  # masks in the original image's frame

    code, out, err = cli("eval", run, "--data", instance_sets["coco-val"])
    assert code == 0, err
    evaluated = json.loads((run / "eval" / "cli" / "metrics.json").read_text())
    assert "mask_map_50" in out and "mask_map_50" in evaluated["metrics"]

    image = sorted((instance_sets["coco-val"].parent / "images").glob("*.png"))[-1]
    code, out, err = cli("predict", run, image, "--conf", "0.0", "--out", tmp_path / "pred")
    assert code == 0, err
    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    ids = np.asarray(Image.open(tmp_path / "pred" / f"0000-{image.stem}-masks.png"))
    width, height = Image.open(image).size
    assert predicted and ids.shape == (height, width) and ids.max() <= len(predicted)
    for k, p in enumerate(predicted):  # each id's pixels lie inside its detection's mask (stronger ones on top)
        (mask,) = decoded([p["segmentation"]], height, width)
        assert mask[ids == k + 1].all()
    assert (tmp_path / "pred" / f"0000-{image.stem}.png").is_file()


def test_export_reloads_to_the_same_boxes_and_masks(fixtures_dir, instance_sets, tmp_path):
    from visiontune.detect.export import save_detector
    from visiontune.detect.model import build_detector
    from visiontune.detect.task import detect_image

    model = _maskrcnn(fixtures_dir).eval()
    model.configure(conf=0.0, iou=None, max_detections=100)
    save_detector(model, tmp_path / "model")
    again = build_detector(str(tmp_path / "model"), None).eval()
    again.configure(conf=0.0, iou=None, max_detections=100)
    assert again.segments and again.class_names == CLASSES
    image = Image.open(sorted((instance_sets["coco-val"].parent / "images").glob("*.png"))[0]).convert("RGB")
    mine, theirs = detect_image(model, image), detect_image(again, image)
    assert len(mine["scores"]) > 0
    torch.testing.assert_close(theirs["boxes"], mine["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs["scores"], mine["scores"], rtol=0, atol=1e-5)
    assert theirs["masks"] == mine["masks"] and mine["masks"][0]["size"] == [image.height, image.width]


def test_box_only_data_stops_before_a_run_folder_exists(fixtures_dir, instance_sets, write_recipe, cli, tmp_path):
    boxes = write_detection_sets(tmp_path / "boxes")
    recipe = detect_recipe(
        fixtures_dir,
        instance_sets,
        tmp_path / "run",
        detector="maskrcnn",
        data={"train": str(boxes["yolo"]), "val": None},
    )
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 2 and "maskrcnn" in err and str(boxes["yolo"]) in err
    assert not (tmp_path / "run").exists()


def _readme_maskrcnn(folder: Path) -> dict:
    """The README's FCOS rebuild lines up to the model, then its Mask R-CNN lines, run on `folder`."""
    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    block = lambda marker: text.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]  # noqa: E731
    head = block("<!-- detect-torchvision-rebuild -->").split("model = detection.FCOS(", 1)[0]
    code = head.replace('folder = "runs/mnist-fcos-lite0/model"', f"folder = {str(folder)!r}")
    scope: dict = {}
    exec(compile(code + block("<!-- detect-maskrcnn-rebuild -->"), "README.md", "exec"), scope)
    return scope


def test_the_readme_lines_rebuild_the_export_with_the_same_masks(fixtures_dir, instance_sets, tmp_path):
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.transforms.v2.functional import to_dtype

    from visiontune.detect.export import save_detector
    from visiontune.detect.masks import MASK_THRESHOLD, encode
    from visiontune.detect.task import detect_image

    model = _maskrcnn(fixtures_dir).eval()
    model.configure(conf=0.05, iou=None, max_detections=100)
    save_detector(model, tmp_path / "model")
    scope = _readme_maskrcnn(tmp_path / "model")
    plain = scope["model"]
    assert scope["names"] == CLASSES
    image = Image.open(sorted((instance_sets["coco-val"].parent / "images").glob("*.png"))[0]).convert(
        "RGB"
    )  # 64 px wide
    pixels = to_dtype(pil_to_tensor(image), torch.float32, scale=True)  # 0..1 exactly as visiontune scales them
    with torch.no_grad():
        theirs = plain([pixels])[0]
    mine = detect_image(model, image)
    assert len(theirs["scores"]) > 0
    torch.testing.assert_close(mine["boxes"], theirs["boxes"], rtol=0, atol=1e-4)
    assert mine["labels"].tolist() == (theirs["labels"] - 1).tolist()
    assert mine["masks"] == encode(theirs["masks"][:, 0] >= MASK_THRESHOLD)
