"""Classification metrics from torchmetrics: top-1/top-5 accuracy, macro-F1, per-class precision/recall and the
confusion matrix. `ClassificationMetrics` plugs into Trainer's `compute_metrics` and keeps the full details."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Scalars under "metrics", plus "per_class" and "confusion_matrix" (rows = true class)."""
    n = len(class_names)
    logits, labels = logits.float(), labels.long()
    metrics = {
        "accuracy": multiclass_accuracy(logits, labels, n, average="micro").item(),
        "macro_f1": multiclass_f1_score(logits, labels, n, average="macro").item(),
        "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
    }
    if n > 5:
        metrics["top5_accuracy"] = multiclass_accuracy(logits, labels, n, average="micro", top_k=5).item()
    precision = multiclass_precision(logits, labels, n, average=None).tolist()
    recall = multiclass_recall(logits, labels, n, average=None).tolist()
    support = torch.bincount(labels, minlength=n).tolist()
    per_class = [
        {"label": c, "precision": p, "recall": r, "support": s}
        for c, p, r, s in zip(class_names, precision, recall, support, strict=True)
    ]
    confusion = multiclass_confusion_matrix(logits, labels, n).tolist()
    return {"metrics": metrics, "per_class": per_class, "confusion_matrix": confusion, "class_names": class_names}


class ClassificationMetrics:
    """Trainer `compute_metrics`: returns scalars and keeps the last full report in `.last`."""

    def __init__(self, class_names: list[str]):
        self.class_names = class_names
        self.last: dict | None = None
        self.last_logits: torch.Tensor | None = None

    def __call__(self, eval_pred) -> dict[str, float]:
        logits = torch.as_tensor(np.asarray(eval_pred.predictions))
        labels = torch.as_tensor(np.asarray(eval_pred.label_ids))
        self.last = classification_report(logits, labels, self.class_names)
        self.last_logits = logits
        return {k: v for k, v in self.last["metrics"].items() if k != "loss"}
