"""Semantic segmentation metrics from one pixel confusion matrix (torchmetrics' `multiclass_confusion_matrix`, whose
`ignore_index` drops ignored pixels before counting): mIoU, per-class IoU, pixel accuracy and mean Dice.

IoU_c = TP / (TP + FP + FN) and Dice_c = 2TP / (2TP + FP + FN) per class; a class absent from both the masks and
the predictions has neither and is left out of the means (mmseg's rule), so a set without a class is not scored
as failing it. Pixel accuracy is the share of counted pixels predicted right.
"""

from __future__ import annotations

from typing import Any

import torch


def pixel_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """[C, C] int64 counts (rows: true class, columns: predicted) of a prediction against its mask (any shape, the
    same for both); target pixels equal to `ignore_index` are not counted."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    matrix = multiclass_confusion_matrix(
        pred.reshape(-1).long(), target.reshape(-1).long(), num_classes, ignore_index=ignore_index, validate_args=False
    )
    return matrix.long().cpu()


def segmentation_scores(matrix: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """{"metrics": {miou, pixel_accuracy, mean_dice}, "per_class_iou": [{label, iou, dice, pixels}], plus the matrix
    and the class names (the report draws the confusion matrix from them)."""
    m = matrix.double()
    tp = m.diag()
    fp, fn = m.sum(0) - tp, m.sum(1) - tp
    present = (tp + fp + fn) > 0
    iou = torch.where(present, tp / (tp + fp + fn).clamp(min=1), torch.nan)
    dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
    total = m.sum()
    metrics = {
        "miou": _mean(iou),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "mean_dice": _mean(dice),
    }
    per_class = [
        {"label": name, "iou": _value(iou[c]), "dice": _value(dice[c]), "pixels": int(matrix[c].sum())}
        for c, name in enumerate(class_names)
    ]
    return {
        "metrics": metrics,
        "per_class_iou": per_class,
        "confusion_matrix": matrix.long().tolist(),
        "class_names": list(class_names),
    }


def _mean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if len(kept) else 0.0


def _value(value: torch.Tensor) -> float | None:
    return None if bool(value.isnan()) else round(float(value), 6)
