"""Mask mAP comes from the same torchmetrics object as box mAP (iou_type bbox + segm, pycocotools): perfect masks
score 1.0, a shifted mask on a perfect box scores lower on masks only, RLE predictions score as the masks they encode,
a crowd region is matched the COCO way, and a mask detector's recipe can select its checkpoint by mask mAP."""

from __future__ import annotations

import pytest
import torch

from visiontune.core.errors import RecipeError
from visiontune.detect.config import DETECTION_METRICS, MASK_METRICS
from visiontune.detect.masks import encode
from visiontune.detect.metrics import detection_report

H, W = 60, 80
CLASSES = ["cat", "dog"]
OBJECTS = [((10, 10, 40, 40), 0), ((45, 20, 75, 55), 1)]  # xyxy rectangles, class


def _masks(shift: int = 0) -> torch.Tensor:
    """The objects' masks: a disc inside each box (so a mask is not its box); `shift` moves the second one right."""
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    out = []
    for k, ((x0, y0, x1, y1), _) in enumerate(OBJECTS):
        cx, cy, r = (x0 + x1) / 2 + (shift if k == 1 else 0), (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
        out.append((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= r**2)
    return torch.stack(out)


def _report(pred_masks, crowd: bool = False) -> dict:
    boxes = torch.tensor([b for b, _ in OBJECTS], dtype=torch.float32)
    labels = torch.tensor([c for _, c in OBJECTS])
    pred = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": labels, "masks": pred_masks}
    target = {"boxes": boxes.tolist(), "labels": labels.tolist(), "iscrowd": [False, False], "masks": _masks()}
    if crowd:
        region = torch.zeros(1, H, W, dtype=torch.bool)
        region[0, 45:, :30] = True
        target = {
            "boxes": [*target["boxes"], [0, 45, 30, 60]],
            "labels": [*target["labels"], 0],
            "iscrowd": [False, False, True],
            "masks": torch.cat([target["masks"], region]),
        }
        pred = {  # one more detection, on the crowd region: neither a hit nor a false positive
            "boxes": torch.cat([boxes, torch.tensor([[2.0, 47, 28, 59]])]),
            "scores": torch.tensor([0.9, 0.8, 0.95]),
            "labels": torch.tensor([0, 1, 0]),
            "masks": torch.cat([pred_masks, region]) if isinstance(pred_masks, torch.Tensor) else pred_masks,
        }
    return detection_report([pred], [target], CLASSES)


def test_perfect_masks_score_one_and_report_every_metric():
    report = _report(_masks())
    assert set(report["metrics"]) == {*DETECTION_METRICS, *MASK_METRICS}
    for name in ("map", "map_50", "map_75", "mask_map", "mask_map_50", "mask_map_75"):
        assert report["metrics"][name] == pytest.approx(1.0)
    assert [c["mask_ap"] for c in report["per_class_ap"]] == [pytest.approx(1.0)] * 2


def test_a_shifted_mask_on_a_perfect_box_lowers_mask_map_only():
    report = _report(_masks(shift=8))  # the second disc moved by 8 px: mask IoU about 0.5 with its object
    metrics = report["metrics"]
    assert metrics["map"] == pytest.approx(1.0)  # the boxes are still perfect
    assert metrics["mask_map"] < 0.75 and metrics["mask_map_75"] == pytest.approx(0.5)
    per_class = {c["label"]: c["mask_ap"] for c in report["per_class_ap"]}
    assert per_class["cat"] == pytest.approx(1.0) and per_class["dog"] < 0.5


def test_rle_predictions_score_as_the_masks_they_encode():
    as_tensor, as_rle = _report(_masks(shift=5)), _report(encode(_masks(shift=5)))
    assert as_rle["metrics"] == as_tensor["metrics"]


def test_a_detection_on_a_crowd_region_is_no_false_positive():
    assert _report(_masks(), crowd=True)["metrics"]["mask_map"] == pytest.approx(1.0)


def test_without_masks_the_report_is_the_box_report():
    boxes = torch.tensor([b for b, _ in OBJECTS], dtype=torch.float32)
    labels = torch.tensor([c for _, c in OBJECTS])
    pred = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": labels}
    report = detection_report([pred], [{"boxes": boxes.tolist(), "labels": labels.tolist()}], CLASSES)
    assert set(report["metrics"]) == set(DETECTION_METRICS) and "mask_ap" not in report["per_class_ap"][0]


def test_train_metric_picks_mask_map_only_for_a_mask_detector(tmp_path):
    from visiontune.recipe import parse_config

    recipe = {
        "task": "detect",
        "model": "timm:resnet18",
        "output_dir": str(tmp_path / "run"),
        "data": {"train": "builtin:mnist-detect"},
        "train": {"metric": "mask_map_50"},
    }
    assert parse_config({**recipe, "detector": "maskrcnn"}).train.metric == "mask_map_50"
    with pytest.raises(RecipeError, match="mask_map_50") as err:
        parse_config({**recipe, "detector": "faster_rcnn"})
    assert "\n" not in str(err.value)


def test_a_saved_mask_detector_as_model_keeps_the_mask_metrics(tmp_path):
    """Fine-tuning a visiontune Mask R-CNN run further: its manifest (no torch needed) says it segments."""
    from visiontune.detect.config import segments_masks

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "visiontune.json").write_text('{"kind": "detector", "detector": "maskrcnn"}')
    (tmp_path / "fcos").mkdir()
    (tmp_path / "fcos" / "visiontune.json").write_text('{"kind": "detector", "detector": "fcos"}')
    assert segments_masks(str(tmp_path / "run"), "fcos") and segments_masks(str(tmp_path / "run" / "model"), "fcos")
    assert not segments_masks(str(tmp_path / "fcos"), "fcos") and not segments_masks(str(tmp_path / "none"), "fcos")
