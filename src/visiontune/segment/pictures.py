"""The segment report's pictures and tables: validation images with the ground truth and the predicted masks before
and after training overlaid, and per-class IoU (through report/sections.py; the report draws the pixel confusion
matrix from eval/after.json itself); and a mask overlaid on an image for `visiontune predict`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visiontune.report.sections import add_section
from visiontune.segment.inference import decode_png_mask

ALPHA = 0.55  # opacity of the class colours over the image
BACKGROUND = ("background", "_background_", "bg")  # classes left uncoloured, so the image shows through


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """One colour per class (matplotlib's tab20, then tab20b), the same in every picture."""
    from matplotlib import colormaps

    table = [*colormaps["tab20"].colors, *colormaps["tab20b"].colors]
    return [tuple(int(255 * v) for v in table[c % len(table)]) for c in range(n)]


def overlay(image: torch.Tensor, mask: torch.Tensor | np.ndarray, class_names: list[str]) -> torch.Tensor:
    """uint8 [3, H, W] with each class's pixels of `mask` (class ids; others, e.g. ignored, left as they are)
    tinted in its colour; a class named background is not tinted."""
    from torchvision.utils import draw_segmentation_masks

    mask = torch.as_tensor(mask)
    shown = [c for c, name in enumerate(class_names) if name.lower() not in BACKGROUND]
    if not shown:
        return image
    masks = torch.stack([mask == c for c in shown])
    colours = class_colours(len(class_names))
    return draw_segmentation_masks(image, masks, alpha=ALPHA, colors=[colours[c] for c in shown])


def report_pictures(run_dir: Path, dataset, before: dict, after: dict) -> None:
    """Sections of the run report: masks on the first validation images, per-class IoU."""
    if after.get("samples"):
        _comparison(dataset, before.get("samples") or [], after["samples"], run_dir / "plots" / "masks.png")
        add_section(
            run_dir,
            "Masks on validation images",
            text="The image, its labelled mask, then the predicted masks before and after training.",
            image="plots/masks.png",
        )
    rows = [[c["label"], c["iou"], c["dice"], c["pixels"]] for c in after.get("per_class_iou", [])]
    if rows:
        add_section(
            run_dir, "Per-class IoU (after training)", header=["class", "IoU", "Dice", "labelled pixels"], rows=rows
        )


def _comparison(dataset, before: list[dict], after: list[dict], out: Path) -> None:
    from visiontune.report.pictures import save_grid

    names = dataset.data.class_names
    earlier = {s["index"]: s for s in before}
    rows = []
    for sample in after:
        image, mask, _ = dataset[sample["index"]]
        pixels = (image.as_subclass(torch.Tensor) * 255).round().to(torch.uint8)
        panels = [pixels, overlay(pixels, mask, names)]
        for found in (earlier.get(sample["index"]), sample):
            panels.append(pixels if found is None else overlay(pixels, decode_png_mask(found["mask"]), names))
        rows.append([panel.permute(1, 2, 0).numpy() for panel in panels])
    save_grid(rows, ("image", "labelled", "before", "after"), out)


def write_prediction(image, mask: np.ndarray, class_names: list[str], stem: Path) -> tuple[Path, Path]:
    """`stem`.png: the class-id mask (8-bit, 16-bit past 255 classes); `stem`-overlay.png: the mask over the image."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from visiontune.segment.inference import mask_dtype

    stem.parent.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = stem.with_name(f"{stem.name}.png"), stem.with_name(f"{stem.name}-overlay.png")
    Image.fromarray(mask.astype(mask_dtype(mask))).save(mask_path)
    shown = overlay(pil_to_tensor(image.convert("RGB")), torch.from_numpy(mask.astype(np.int64)), class_names)
    Image.fromarray(shown.permute(1, 2, 0).numpy()).save(overlay_path)
    return mask_path, overlay_path
