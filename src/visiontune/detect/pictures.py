"""The detect report's pictures and tables: validation images with ground truth, the detections before and after
training side by side, per-class AP, precision-recall curves (through report/sections.py); and predicted boxes drawn
on an image for `visiontune predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visiontune.report.sections import add_section

SHOWN_SCORE = 0.3  # detections drawn in pictures (evaluation itself scores weaker ones too)
TRUTH, FOUND = "#22aa22", "#dd2222"


def report_pictures(run_dir: Path, dataset, before: dict, after: dict) -> None:
    """Sections of the run report: detections on the first validation images, per-class AP, PR curves."""
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    if after.get("samples"):
        _comparison(dataset, before.get("samples") or [], after["samples"], plots / "detections.png")
        add_section(
            run_dir,
            "Detections on validation images",
            text=f"Ground truth (green), then the detections before and after training (red, score >= {SHOWN_SCORE}).",
            image="plots/detections.png",
        )
    rows = [[c["label"], c["ap"], c["ap_50"], c["objects"]] for c in after.get("per_class_ap", [])]
    if rows:
        add_section(run_dir, "Per-class AP (after training)", header=["class", "AP", "AP@.5", "objects"], rows=rows)
    if after.get("pr_curves"):
        _pr_curves(after["pr_curves"], plots / "pr_curves.png")
        add_section(
            run_dir,
            "Precision-recall curves (after training)",
            text="At IoU 0.5, all object sizes, up to 100 detections per image.",
            image="plots/pr_curves.png",
        )


def drawn(image: torch.Tensor, boxes: list | torch.Tensor, labels: list[str], colour: str) -> torch.Tensor:
    """uint8 [3, H, W] with the boxes drawn."""
    from torchvision.utils import draw_bounding_boxes

    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return image
    return draw_bounding_boxes(image, boxes, labels=labels, colors=colour, width=2)


def _comparison(dataset, before: list[dict], after: list[dict], out: Path) -> None:
    from visiontune.report.pictures import save_grid

    names = dataset.data.class_names
    earlier = {s["image_id"]: s for s in before}
    rows = []
    for sample in after:
        image, target = dataset[sample["image_id"]]
        pixels = (image.as_subclass(torch.Tensor) * 255).round().to(torch.uint8)
        record = dataset.data.records[sample["image_id"]]
        scale = torch.tensor([image.shape[-1] / record.width, image.shape[-2] / record.height] * 2)
        truth = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4) * scale
        panels = [drawn(pixels, truth, [names[c] for c in record.labels], TRUTH)]
        for found in (earlier.get(sample["image_id"]), sample):
            panels.append(pixels if found is None else _drawn_found(pixels, found, names, scale))
        rows.append([panel.permute(1, 2, 0).numpy() for panel in panels])
    save_grid(rows, ("ground truth", "before", "after"), out)


def _drawn_found(pixels: torch.Tensor, found: dict, names: list[str], scale: torch.Tensor) -> torch.Tensor:
    shown = [i for i, s in enumerate(found["scores"]) if s >= SHOWN_SCORE]
    boxes = torch.tensor([found["boxes"][i] for i in shown], dtype=torch.float32).reshape(-1, 4) * scale
    labels = [f"{names[found['labels'][i]]} {found['scores'][i]:.2f}" for i in shown]
    return drawn(pixels, boxes, labels, FOUND)


def _pr_curves(curves: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, precision in curves.items():
        recall = [i / (len(precision) - 1) for i in range(len(precision))]
        ax.plot(recall, precision, label=name, linewidth=1.2)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def draw_predictions(image: Any, found: dict, names: list[str], out: Path) -> Path:
    """A PIL image with `found` boxes (its own pixels) drawn, saved to `out`."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    labels = [f"{names[int(c)]} {float(s):.2f}" for s, c in zip(found["scores"], found["labels"], strict=True)]
    pixels = drawn(pil_to_tensor(image.convert("RGB")), found["boxes"], labels, FOUND)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out)
    return out
