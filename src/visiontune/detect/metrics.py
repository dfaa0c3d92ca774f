"""COCO box metrics from torchmetrics' `MeanAveragePrecision` on the pycocotools backend (COCOeval itself):
mAP@[.5:.95], mAP@.5, mAP@.75, mAP small/medium/large, AR@100, per-class AP and precision-recall curves. Crowd regions
(`iscrowd`) are matched the COCO way: a detection on one is neither a hit nor a false positive. With instance masks
the same metric object scores them too (iou_type bbox + segm): mask_map, mask_map_50, mask_map_75, per-class mask AP.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from visiontune.detect.config import DETECTION_METRICS, MASK_METRICS


def detection_report(preds: list[dict], targets: list[dict], class_names: list[str]) -> dict[str, Any]:
    """preds: [{"boxes" xyxy, "scores", "labels"}], targets: [{"boxes", "labels", "iscrowd"}], one per image, in the
    same (original image) pixel frame. Scalars under "metrics" (-1 where COCO has nothing to measure, e.g. no small
    objects); "per_class": AP, AP@.5 and object count per class; "pr_curves": precision at each recall point (IoU .5,
    all sizes, up to 100 detections) per class. With "masks" in the targets (uint8/bool [M, H, W], or a function
    returning them: drawn one image at a time, as a large set's masks would not fit in memory at once) and the preds
    (RLEs from detect/masks.py:encode, or a bool [N, H, W]), the mask metrics and per-class mask AP are added."""
    from torchmetrics.detection import MeanAveragePrecision

    masks = bool(targets) and all("masks" in t for t in targets) and all("masks" in p for p in preds)
    metric = MeanAveragePrecision(
        box_format="xyxy",
        iou_type=("bbox", "segm") if masks else "bbox",
        class_metrics=True,
        extended_summary=True,
        backend="pycocotools",
    )
    for p, t in zip(preds, targets, strict=True):  # one image at a time: torchmetrics keeps masks as RLE
        if masks and callable(t["masks"]):
            t = {**t, "masks": t["masks"]()}
        metric.update([_pred(p, t if masks else None)], [_target(t, masks)])
    result = metric.compute()
    box = (lambda name: result[f"bbox_{name}"]) if masks else (lambda name: result[name])  # noqa: E731
    metrics = {name: float(box(name)) for name in DETECTION_METRICS}
    if masks:
        metrics |= {name: float(result["segm_" + name.removeprefix("mask_")]) for name in MASK_METRICS}
    classes = [int(c) for c in torch.atleast_1d(result["classes"]).tolist()]
    precision = box("precision")  # [IoU thresholds, recall points, classes, areas, max detections]
    curves, ap50 = {}, {}
    for k, c in enumerate(classes):
        curve = precision[0, :, k, 0, -1]
        if (curve >= 0).any():  # -1: the class has no ground truth objects here
            curves[class_names[c]] = curve.clamp(min=0).tolist()
            ap50[c] = float(curve.clamp(min=0).mean())
    ap = dict(zip(classes, torch.atleast_1d(box("map_per_class")).tolist(), strict=True))
    mask_ap = dict(zip(classes, torch.atleast_1d(result["segm_map_per_class"]).tolist(), strict=True)) if masks else {}
    counts = _object_counts(targets, len(class_names))
    per_class = [
        {
            "label": name,
            "ap": _present(ap.get(c)),
            "ap_50": ap50.get(c),
            **({"mask_ap": _present(mask_ap.get(c))} if masks else {}),
            "objects": counts[c],
        }
        for c, name in enumerate(class_names)
    ]
    return {"metrics": metrics, "per_class_ap": per_class, "pr_curves": curves, "class_names": list(class_names)}


def _pred(p: dict, target: dict | None = None) -> dict[str, torch.Tensor]:
    out = {"boxes": p["boxes"].float().reshape(-1, 4), "scores": p["scores"].float(), "labels": p["labels"].long()}
    if target is not None:
        out["masks"] = _mask_tensor(p["masks"], np.shape(target["masks"])[-2:])
    return out


def _target(t: dict, masks: bool = False) -> dict[str, torch.Tensor]:
    boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(t["labels"], dtype=torch.long).reshape(-1)
    crowd = torch.as_tensor(t.get("iscrowd", [False] * len(labels)), dtype=torch.bool).reshape(-1)
    out = {"boxes": boxes, "labels": labels, "iscrowd": crowd.long()}
    if masks:
        out["masks"] = _mask_tensor(t["masks"], np.shape(t["masks"])[-2:])
    return out


def _mask_tensor(masks: Any, size: tuple[int, int]) -> torch.Tensor:
    """bool [N, H, W] of RLEs (detect/masks.py:encode) or of an array / tensor."""
    from visiontune.detect.masks import decoded

    if isinstance(masks, list):
        return torch.from_numpy(decoded(masks, *size))
    return torch.as_tensor(np.asarray(masks)).bool().reshape(-1, *size)


def _object_counts(targets: list[dict], n: int) -> list[int]:
    counts = [0] * n
    for t in targets:
        crowd = t.get("iscrowd", [False] * len(t["labels"]))
        for label, is_crowd in zip(torch.as_tensor(t["labels"]).tolist(), torch.as_tensor(crowd).tolist(), strict=True):
            counts[int(label)] += 0 if is_crowd else 1
    return counts


def _present(value: float | None) -> float | None:
    return None if value is None or value < 0 else value
