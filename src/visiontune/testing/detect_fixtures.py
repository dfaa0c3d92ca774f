"""A small generated detection set written in COCO, YOLO and Pascal VOC form (the same images and boxes), for tests
and `visiontune fixtures`: coloured rectangles on noise, 3 classes, every fourth image without objects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["blue", "green", "red"]  # alphabetical, so VOC (names sorted) orders them as COCO (by id) and YOLO do
COCO_IDS = [3, 7, 11]  # not contiguous on purpose
COLOURS = {"blue": (40, 60, 230), "green": (40, 210, 60), "red": (230, 40, 40)}
SIZES = [(64, 48), (48, 64), (80, 60), (60, 60)]  # (width, height): landscape, portrait and square images


def detection_samples(n: int = 12, seed: int = 0) -> list[tuple[np.ndarray, list[tuple[int, ...]], list[int]]]:
    """n (image uint8 [H, W, 3], xyxy integer boxes, class indices); image i has no objects when i % 4 == 3."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        image = rng.integers(90, 150, size=(h, w, 3), dtype=np.uint8)
        boxes: list[tuple[int, ...]] = []
        labels: list[int] = []
        for _ in range(0 if i % 4 == 3 else int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(8, w // 2)), int(rng.integers(8, h // 2))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                continue  # rectangles do not overlap, so each box is exactly its visible rectangle
            label = int(rng.integers(0, len(CLASSES)))
            image[box[1] : box[3], box[0] : box[2]] = COLOURS[CLASSES[label]]
            boxes.append(box)
            labels.append(label)
        samples.append((image, boxes, labels))
    return samples


def write_detection_sets(out: Path, n: int = 12, n_val: int = 4) -> dict[str, Path]:
    """The set in three forms, the last `n_val` images as the val split:
    coco-train / coco-val (COCO JSON, category ids 3, 7, 11), yolo (data.yaml; read with split train or val),
    voc (folder with ImageSets/Main/train.txt and val.txt)."""
    samples = detection_samples(n)
    splits = {"train": list(range(n - n_val)), "val": list(range(n - n_val, n))}
    paths = _write_coco(out / "coco", samples, splits)
    paths["yolo"] = _write_yolo(out / "yolo", samples, splits)
    paths["voc"] = _write_voc(out / "voc", samples, splits)
    return paths


def _name(i: int) -> str:
    return f"img_{i:03d}"


def _write_coco(root: Path, samples: list, splits: dict[str, list[int]]) -> dict[str, Path]:
    categories = [{"id": c, "name": name} for c, name in zip(COCO_IDS, CLASSES, strict=True)]

    def annotate(i: int) -> list[dict]:
        _, boxes, labels = samples[i]
        return [
            {
                "category_id": COCO_IDS[label],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
            for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True)
        ]

    return write_coco(root, [s[0] for s in samples], splits, categories, annotate)


def write_coco(
    root: Path, images: list[np.ndarray], splits: dict[str, list[int]], categories: list[dict], annotate
) -> dict[str, Path]:
    """root/SPLIT.json (keys coco-SPLIT) over root/images/img_NNN.png (image ids 100 + i, annotation ids from 1):
    `annotate(i)` gives image i's annotations without their ids. Shared with the segmentation fixtures."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, indices in splits.items():
        entries, annotations = [], []
        for i in indices:
            Image.fromarray(images[i]).save(root / "images" / f"{_name(i)}.png")
            h, w = images[i].shape[:2]
            entries.append({"id": 100 + i, "file_name": f"images/{_name(i)}.png", "width": w, "height": h})
            for ann in annotate(i):
                annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, **ann})
        coco = {"images": entries, "annotations": annotations, "categories": categories}
        paths[f"coco-{split}"] = root / f"{split}.json"
        paths[f"coco-{split}"].write_text(json.dumps(coco, indent=1), encoding="utf-8")
    return paths


def _write_yolo(root: Path, samples: list, splits: dict[str, list[int]]) -> Path:
    for split, indices in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in indices:
            image, boxes, labels = samples[i]
            h, w = image.shape[:2]
            Image.fromarray(image).save(root / "images" / split / f"{_name(i)}.png")
            if not boxes:
                continue  # a negative has no label file (an empty one would do as well)
            lines = [
                f"{label} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
                for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True)
            ]
            (root / "labels" / split / f"{_name(i)}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    names = "\n".join(f"  {k}: {name}" for k, name in enumerate(CLASSES))
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return root / "data.yaml"


def _write_voc(root: Path, samples: list, splits: dict[str, list[int]]) -> Path:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, indices in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{_name(i)}\n" for i in indices))
        for i in indices:
            image, boxes, labels = samples[i]
            Image.fromarray(image).save(root / "JPEGImages" / f"{_name(i)}.png")
            (root / "Annotations" / f"{_name(i)}.xml").write_text(_voc_xml(_name(i), image, boxes, labels))
    return root


def _voc_xml(name: str, image: np.ndarray, boxes: list, labels: list[int]) -> str:
    """VOC pixel indices are 1-based and inclusive: the continuous box [x0, x1) is xmin x0 + 1, xmax x1."""
    objects = "".join(
        f"<object><name>{CLASSES[label]}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
        f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True)
    )
    size = f"<size><width>{image.shape[1]}</width><height>{image.shape[0]}</height><depth>3</depth></size>"
    return f"<annotation><filename>{name}.png</filename>{size}{objects}</annotation>\n"


# ------------------------------------------------------------------------------------- instance masks (maskrcnn)


def write_instance_sets(out: Path, n: int = 12, n_val: int = 4) -> dict[str, Path]:
    """The COCO set of `write_detection_sets` with each rectangle's mask as `segmentation`, in every form COCO has:
    a polygon (objects 0, 3, ...), a compressed RLE (1, 4, ...), an uncompressed RLE (2, 5, ...); plus one crowd
    region (an uncompressed RLE, iscrowd 1) on the first image. Keys coco-train / coco-val, and yolo: the same
    rectangles as Ultralytics polygon labels (no crowd region: YOLO has none)."""
    samples = detection_samples(n)
    splits = {"train": list(range(n - n_val)), "val": list(range(n - n_val, n))}
    categories = [{"id": c, "name": name} for c, name in zip(COCO_IDS, CLASSES, strict=True)]

    def annotate(i: int) -> list[dict]:
        image, boxes, labels = samples[i]
        h, w = image.shape[:2]
        anns = []
        for k, ((x0, y0, x1, y1), label) in enumerate(zip(boxes, labels, strict=True)):
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[y0:y1, x0:x1] = 1
            anns.append(
                {
                    "category_id": COCO_IDS[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "segmentation": rectangle_shape(k % 3, mask, (x0, y0, x1, y1)),
                    "iscrowd": 0,
                }
            )
        if i == 0:  # a crowd region in the top-left corner: ignored by training and matched the COCO way in mAP
            crowd = np.zeros((h, w), dtype=np.uint8)
            crowd[:6, :6] = 1
            anns.append(
                {
                    "category_id": COCO_IDS[0],
                    "bbox": [0, 0, 6, 6],
                    "area": 36,
                    "segmentation": rectangle_shape(2, crowd, (0, 0, 6, 6)),
                    "iscrowd": 1,
                }
            )
        return anns

    paths = write_coco(out / "coco-masks", [s[0] for s in samples], splits, categories, annotate)
    paths["yolo"] = _write_yolo_polygons(out / "yolo-seg", samples, splits)
    return paths


def _write_yolo_polygons(root: Path, samples: list, splits: dict[str, list[int]]) -> Path:
    """Ultralytics segmentation labels: `class x1 y1 x2 y2 ...`, each rectangle's corners in fractions."""
    _write_yolo(root, samples, splits)
    for split, indices in splits.items():
        for i in indices:
            image, boxes, labels = samples[i]
            h, w = image.shape[:2]
            lines = [
                f"{label} " + " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
                for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True)
            ]
            if lines:
                (root / "labels" / split / f"{_name(i)}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "data.yaml"


def rectangle_shape(form: int, mask: np.ndarray, box: tuple[int, ...]) -> list | dict:
    """A rectangle's COCO segmentation: 0 a polygon (its corners, on pixel edges), 1 a compressed RLE (counts as
    text), 2 an uncompressed RLE (counts as a list, column-major runs starting with background)."""
    from pycocotools import mask as coco_mask

    x0, y0, x1, y1 = box
    if form == 0:
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    if form == 1:
        rle = coco_mask.encode(np.asfortranarray(mask))
        return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}
    flat, counts, value, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    return {"size": list(mask.shape), "counts": [*counts, run]}
