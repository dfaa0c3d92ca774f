"""A small generated segmentation set written in every form visiontune reads (the same images and masks): a label-id
mask folder, an RGB-palette mask folder, Pascal VOC, COCO (polygons, RLE, crowd) and a saved `datasets` dataset.
Coloured rectangles on noise, 3 classes + background; every third image has a crowd / ignore rectangle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["background", "blue", "green", "red"]  # id = index; VOC and COCO order them the same way
COLOURS = {"blue": (40, 60, 230), "green": (40, 210, 60), "red": (230, 40, 40)}  # image colours of the objects
PALETTE = {"background": [0, 0, 0], "blue": [0, 0, 128], "green": [0, 128, 0], "red": [128, 0, 0]}
PALETTE_IGNORE = [224, 224, 192]  # VOC's border colour, written for ignore pixels in palette masks
IGNORE = 255
COCO_IDS = [3, 7, 11]  # categories blue, green, red; not contiguous on purpose
SIZES = [(64, 48), (48, 64), (80, 60), (60, 60)]  # (width, height)


def segmentation_samples(n: int = 12, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, list[tuple]]]:
    """n (image uint8 [H, W, 3], mask uint8 [H, W] of ids with IGNORE, rectangles (x0, y0, x1, y1, id)): objects
    do not overlap; image i % 3 == 2 gets an ignore rectangle (id IGNORE) painted white."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        image = rng.integers(90, 150, size=(h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        rects: list[tuple] = []
        wanted = [int(rng.integers(1, len(CLASSES))) for _ in range(int(rng.integers(1, 4)))]
        for label in wanted + ([IGNORE] if i % 3 == 2 else []):
            bw, bh = int(rng.integers(6, w // 2)), int(rng.integers(6, h // 2))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            rect = (x0, y0, x0 + bw, y0 + bh, label)
            if any(x0 < r[2] and r[0] < rect[2] and y0 < r[3] and r[1] < rect[3] for r in rects):
                continue
            colour = (250, 250, 250) if label == IGNORE else COLOURS[CLASSES[label]]
            image[y0 : rect[3], x0 : rect[2]] = colour
            mask[y0 : rect[3], x0 : rect[2]] = label
            rects.append(rect)
        samples.append((image, mask, rects))
    return samples


def write_segmentation_sets(out: Path, n: int = 12, n_val: int = 4) -> dict[str, Path]:
    """The set in every form, the last `n_val` images as the val split:
    ids (images/SPLIT + masks/SPLIT, L-mode label ids, classes.txt), palette (SPLIT/images + SPLIT/masks, RGB masks
    in PALETTE, ignore in PALETTE_IGNORE), voc (JPEGImages as PNG, P-mode SegmentationClass, ImageSets/Segmentation,
    classes.txt), coco-train / coco-val (objects as polygons or RLE, ignore rectangles as crowd RLE), hf (a saved
    DatasetDict with `image` and `annotation` columns)."""
    samples = segmentation_samples(n)
    splits = {"train": list(range(n - n_val)), "val": list(range(n - n_val, n))}
    paths = {
        "ids": _write_ids(out / "ids", samples, splits),
        "palette": _write_palette(out / "palette", samples, splits),
    }
    paths["voc"] = _write_voc(out / "voc", samples, splits)
    paths |= _write_coco(out / "coco", samples, splits)
    paths["hf"] = _write_hf(out / "hf", samples, splits)
    return paths


def _name(i: int) -> str:
    return f"img_{i:03d}"


def _write_ids(root: Path, samples: list, splits: dict[str, list[int]]) -> Path:
    for split, indices in splits.items():
        for folder in ("images", "masks"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for i in indices:
            Image.fromarray(samples[i][0]).save(root / "images" / split / f"{_name(i)}.png")
            Image.fromarray(samples[i][1]).save(root / "masks" / split / f"{_name(i)}.png")
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    return root


def palette_mask(mask: np.ndarray) -> np.ndarray:
    """The ids mask as RGB colours of PALETTE (PALETTE_IGNORE for ignore)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    for k, name in enumerate(CLASSES):
        table[k] = PALETTE[name]
    table[IGNORE] = PALETTE_IGNORE
    return table[mask]


def _write_palette(root: Path, samples: list, splits: dict[str, list[int]]) -> Path:
    for split, indices in splits.items():
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in indices:
            Image.fromarray(samples[i][0]).save(root / split / "images" / f"{_name(i)}.png")
            Image.fromarray(palette_mask(samples[i][1])).save(root / split / "masks" / f"{_name(i)}.png")
    return root


def _write_voc(root: Path, samples: list, splits: dict[str, list[int]]) -> Path:
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    flat = palette_mask(np.arange(256, dtype=np.uint8)[None])[0].ravel().tolist()
    for split, indices in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{_name(i)}\n" for i in indices))
        for i in indices:
            Image.fromarray(samples[i][0]).save(root / "JPEGImages" / f"{_name(i)}.png")
            mask = Image.fromarray(samples[i][1]).convert("P")
            mask.putpalette(flat)  # a palette PNG as VOC ships them: the indices are the ids
            mask.save(root / "SegmentationClass" / f"{_name(i)}.png")
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    return root


def _write_coco(root: Path, samples: list, splits: dict[str, list[int]]) -> dict[str, Path]:
    """Objects alternate between a polygon and compressed RLE; ignore rectangles are crowd RLE regions."""
    from visiontune.testing.detect_fixtures import write_coco

    categories = [{"id": c, "name": name} for c, name in zip(COCO_IDS, CLASSES[1:], strict=True)]

    def annotate(i: int) -> list[dict]:
        image, _, rects = samples[i]
        h, w = image.shape[:2]
        return [
            {
                "category_id": COCO_IDS[(i % 3) if label == IGNORE else label - 1],
                "segmentation": _segmentation((x0, y0, x1, y1), w, h, rle=label == IGNORE or (i + k) % 2 == 1),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": int(label == IGNORE),
            }
            for k, (x0, y0, x1, y1, label) in enumerate(rects)
        ]

    return write_coco(root, [s[0] for s in samples], splits, categories, annotate)


def _segmentation(rect: tuple[int, int, int, int], w: int, h: int, rle: bool) -> list | dict:
    """A rectangle as a polygon (pycocotools fills exactly its pixels) or as compressed RLE."""
    x0, y0, x1, y1 = rect
    if not rle:
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    from pycocotools import mask as coco_mask

    region = np.zeros((h, w), dtype=np.uint8, order="F")
    region[y0:y1, x0:x1] = 1
    encoded = coco_mask.encode(region)
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def _write_hf(root: Path, samples: list, splits: dict[str, list[int]]) -> Path:
    import datasets

    def rows(indices: list[int]) -> dict[str, list]:
        images = [Image.fromarray(samples[i][0]) for i in indices]
        return {"image": images, "annotation": [Image.fromarray(samples[i][1]) for i in indices]}

    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    parts = {s: datasets.Dataset.from_dict(rows(ix), features=features) for s, ix in splits.items()}
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return root
