"""The detect report's pictures and tables: validation images with ground truth, the detections before and after
training side by side (a mask detector's masks overlaid), per-class AP (and mask AP), precision-recall curves
(through report/sections.py); and predicted boxes (and masks) drawn on an image for `visiontune predict`, with an
instance-id PNG of the masks."""

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
            text=f"Ground truth (green), then the detections before and after training (red, score >= {SHOWN_SCORE})"
            + (", each object's mask tinted." if "masks" in after["samples"][0] else "."),
            image="plots/detections.png",
        )
    per_class = after.get("per_class_ap", [])
    masks = bool(per_class) and "mask_ap" in per_class[0]
    header = ["class", "AP", "AP@.5", *(["mask AP"] if masks else []), "objects"]
    rows = [[c["label"], c["ap"], c["ap_50"], *([c["mask_ap"]] if masks else []), c["objects"]] for c in per_class]
    if rows:
        add_section(run_dir, "Per-class AP (after training)", header=header, rows=rows)
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
        shown = pixels
        if record.segments is not None:
            from visiontune.detect.masks import instance_masks

            shown = overlaid(pixels, torch.from_numpy(instance_masks(record)), TRUTH)
        panels = [drawn(shown, truth, [names[c] for c in record.labels], TRUTH)]
        for found in (earlier.get(sample["image_id"]), sample):
            panels.append(pixels if found is None else _drawn_found(pixels, found, names, scale))
        rows.append([panel.permute(1, 2, 0).numpy() for panel in panels])
    save_grid(rows, ("ground truth", "before", "after"), out)


def _drawn_found(pixels: torch.Tensor, found: dict, names: list[str], scale: torch.Tensor) -> torch.Tensor:
    shown = [i for i, s in enumerate(found["scores"]) if s >= SHOWN_SCORE]
    boxes = torch.tensor([found["boxes"][i] for i in shown], dtype=torch.float32).reshape(-1, 4) * scale
    labels = [f"{names[found['labels'][i]]} {found['scores'][i]:.2f}" for i in shown]
    if found.get("masks") and shown:
        from visiontune.detect.masks import decoded

        height, width = found["masks"][0]["size"]
        masks = torch.from_numpy(decoded([found["masks"][i] for i in shown], height, width))
        pixels = overlaid(pixels, masks, FOUND)
    return drawn(pixels, boxes, labels, FOUND)


def overlaid(pixels: torch.Tensor, masks: torch.Tensor, colour: str) -> torch.Tensor:
    """uint8 [3, H, W] with instance masks [N, h, w] (any frame: resized nearest to the picture) tinted on it."""
    from torchvision.transforms.v2.functional import resize
    from torchvision.utils import draw_segmentation_masks

    if len(masks) == 0:
        return pixels
    fitted = resize(masks.to(torch.uint8), list(pixels.shape[-2:]), interpolation=0).bool()  # 0: NEAREST
    return draw_segmentation_masks(pixels, fitted, alpha=0.45, colors=colour)


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
    pixels = pil_to_tensor(image.convert("RGB"))
    if found.get("masks"):
        from visiontune.detect.masks import decoded

        pixels = overlaid(pixels, torch.from_numpy(decoded(found["masks"], image.height, image.width)), FOUND)
    pixels = drawn(pixels, found["boxes"], labels, FOUND)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out)
    return out


def write_instance_png(rles: list[dict], height: int, width: int, out: Path) -> Path:
    """The detections' masks as one PNG of instance ids: 0 where no object is, k + 1 on detection k's pixels (in
    score order: where masks overlap, the stronger detection keeps the pixel); 16-bit beyond 255 detections."""
    import numpy as np
    from PIL import Image

    from visiontune.detect.masks import decoded

    ids = np.zeros((height, width), dtype=np.uint16 if len(rles) > 255 else np.uint8)
    for k, mask in reversed(list(enumerate(decoded(rles, height, width)))):
        ids[mask] = k + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids).save(out)
    return out
