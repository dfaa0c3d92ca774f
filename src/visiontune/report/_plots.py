"""PNG plots under run_dir/plots: loss curves, eval metric curves, confusion matrix. Each returns None when its
data is missing, so the report can leave the section out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visiontune.report._inputs import RunInputs, is_number, series

EVAL_CURVES = {
    "eval_accuracy": "accuracy",
    "eval_macro_f1": "macro F1",
    "eval_top5_accuracy": "top-5 accuracy",
    "eval_miou": "mIoU",
    "eval_pixel_accuracy": "pixel accuracy",
}
ANNOTATE_MAX_CLASSES = 20
NAMES_MAX_CLASSES = 60  # beyond this tick labels overlap into a black bar


def make_plots(run: RunInputs, plots_dir: Path) -> dict[str, Path]:
    """Draw every plot the inputs allow; returns {"loss"|"metrics"|"confusion_matrix": png path}."""
    made = {
        "loss": plot_loss(run.records, plots_dir / "loss.png"),
        "metrics": plot_eval_metrics(run.records, plots_dir / "metrics.png"),
        "confusion_matrix": plot_confusion(run.after, plots_dir / "confusion_matrix.png"),
    }
    return {name: path for name, path in made.items() if path is not None}


def _pyplot():
    # Agg: reports are written on headless training machines; never open a window or need a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    curves = {"train loss": series(records, "loss"), "eval loss": series(records, "eval_loss")}
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for label, (steps, values) in curves.items():
        # Eval points are sparse; markers keep a single evaluation visible.
        ax.plot(steps, values, label=label, marker="o" if label.startswith("eval") else None, markersize=4)
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_eval_metrics(records: list[dict[str, Any]], path: Path) -> Path | None:
    curves = {label: series(records, key) for key, label in EVAL_CURVES.items()}
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, label=label, marker="o", markersize=4)
    ax.set(xlabel="step", ylabel="score", title="Validation metrics", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def confusion_data(report: dict[str, Any] | None) -> tuple[list[list[int]], list[str]] | None:
    """(square matrix, class names) from an eval report, or None when it is absent or malformed."""
    matrix = report.get("confusion_matrix") if report else None
    if not isinstance(matrix, list) or not matrix:
        return None
    n = len(matrix)
    if not all(isinstance(row, list) and len(row) == n and all(is_number(v) for v in row) for row in matrix):
        return None
    names = report.get("class_names")
    if not (isinstance(names, list) and len(names) == n):
        names = list(range(n))
    return [[int(v) for v in row] for row in matrix], [str(c) for c in names]


def plot_confusion(report: dict[str, Any] | None, path: Path) -> Path | None:
    data = confusion_data(report)
    if data is None:
        return None
    matrix, names = data
    n = len(names)
    import numpy as np

    counts = np.asarray(matrix)
    # Colour by share of each true class so rare classes are as readable as common ones; the text shows counts.
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * n, 16)
    fig, ax = _pyplot().subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (after training)")
    if n <= NAMES_MAX_CLASSES:
        ax.set_xticks(range(n), names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
        ax.set_yticks(range(n), names)
    if n <= ANNOTATE_MAX_CLASSES:
        for i in range(n):
            for j in range(n):
                color = "white" if shares[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=8)
    return _save(fig, path)
