"""detect/metrics.py reports what pycocotools' COCOeval, run directly, reports on the same hand-built case: crowd
regions (a detection on one is neither a hit nor a false positive), images with no objects, images with no
detections, a missed object, a duplicate, a wrong class, small and medium objects."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from visiontune.detect.metrics import detection_report

CLASSES = ["cat", "dog", "fox"]
# Per image: ground truth (xyxy, class, crowd) and detections (xyxy, class, score), in pixels.
CASE = [
    {
        "truth": [((10, 10, 50, 60), 0, False), ((60, 10, 90, 30), 1, False), ((0, 70, 100, 100), 0, True)],
        "found": [((12, 11, 49, 58), 0, 0.9), ((61, 12, 92, 31), 1, 0.8), ((10, 75, 40, 95), 0, 0.99)],
    },
    {"truth": [], "found": [((5, 5, 25, 25), 2, 0.6)]},  # an image without objects: a false positive
    {"truth": [], "found": []},  # a negative handled right
    {
        "truth": [((20, 20, 28, 28), 2, False), ((40, 40, 120, 120), 1, False)],
        "found": [((21, 19, 29, 27), 2, 0.95), ((40, 40, 120, 120), 0, 0.85), ((42, 41, 118, 122), 1, 0.5)],
    },
    {"truth": [((30, 30, 70, 70), 0, False)], "found": []},  # missed
    {
        "truth": [((0, 0, 40, 40), 1, False)],
        "found": [((1, 1, 40, 41), 1, 0.7), ((2, 0, 41, 40), 1, 0.65), ((60, 60, 80, 80), 1, 0.3)],  # a duplicate
    },
]


def _ours() -> dict:
    preds, targets = [], []
    for image in CASE:
        preds.append(
            {
                "boxes": torch.tensor([f[0] for f in image["found"]], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor([f[2] for f in image["found"]]),
                "labels": torch.tensor([f[1] for f in image["found"]], dtype=torch.long),
            }
        )
        targets.append(
            {
                "boxes": [t[0] for t in image["truth"]],
                "labels": [t[1] for t in image["truth"]],
                "iscrowd": [t[2] for t in image["truth"]],
            }
        )
    return detection_report(preds, targets, CLASSES)


def _cocoeval() -> object:
    """COCOeval on the same case, written out as COCO ground truth and results (area = box area: boxes only)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, image in enumerate(CASE):
        images.append({"id": i, "width": 128, "height": 128})
        for (x0, y0, x1, y1), c, crowd in image["truth"]:
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
        for (x0, y0, x1, y1), c, score in image["found"]:
            results.append({"image_id": i, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(3)]}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def test_metrics_match_cocoeval_with_crowd_and_empty_images():
    ours, theirs = _ours(), _cocoeval()
    stats = theirs.stats  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    expected = dict(zip(["map", "map_50", "map_75", "map_small", "map_medium", "map_large"], stats[:6], strict=True))
    expected["mar_100"] = stats[8]
    assert ours["metrics"] == pytest.approx(expected, abs=1e-6)
    assert 0 < ours["metrics"]["map"] < 1  # the case is neither perfect nor hopeless


def test_per_class_ap_and_curves_match_cocoeval():
    ours, theirs = _ours(), _cocoeval()
    precision = theirs.eval["precision"]  # [IoU, recall, class, area, max detections]
    for c, name in enumerate(CLASSES):
        row = next(r for r in ours["per_class_ap"] if r["label"] == name)
        per_iou = precision[:, :, c, 0, -1]
        assert row["ap"] == pytest.approx(per_iou[per_iou > -1].mean(), abs=1e-6)
        assert row["ap_50"] == pytest.approx(precision[0, :, c, 0, -1].clip(min=0).mean(), abs=1e-6)
        assert ours["pr_curves"][name] == pytest.approx(precision[0, :, c, 0, -1].clip(min=0).tolist(), abs=1e-6)
    assert [r["objects"] for r in ours["per_class_ap"]] == [2, 3, 1]  # the crowd region is no object


def test_a_detection_on_a_crowd_region_costs_nothing():
    """Moving the detection off the crowd region makes it a false positive: AP drops only then."""
    on_crowd = _ours()["metrics"]["map_50"]
    CASE[0]["found"][2] = ((200, 200, 230, 220), 0, 0.99)
    try:
        off_crowd = _ours()["metrics"]["map_50"]
    finally:
        CASE[0]["found"][2] = ((10, 75, 40, 95), 0, 0.99)
    assert off_crowd < on_crowd
