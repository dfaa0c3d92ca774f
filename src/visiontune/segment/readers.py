"""Format readers behind segment/data.py:read_masks. Each lists its samples (image + mask) and the classes and
decoding of its masks; check.py:assemble probes every image, decodes every mask and applies data.on_bad_sample.

- Mask folder: images/ + masks/ (or annotations/), a mask per image with the same relative path and stem (any
  image suffix; masks are PNG). Split folders are found as SPLIT/images + SPLIT/masks or images/SPLIT +
  masks/SPLIT (`train` also as `training`, `val` as `validation`: ADE20K's ADEChallengeData2016 layout). Masks
  hold label ids (mode L / P / I;16: the value is the class id), or RGB colours when `palette` is given. Class
  names: data.class_names, else classes.txt beside images/ (one name per line, line k = id k), else the ids found
  ("0", "1", ..., up to the largest id any mask holds). A mask with no image and an image with no mask are bad.
- Pascal VOC: JPEGImages/ + SegmentationClass/ (palette PNGs whose indices are the ids; 255 = the border, ignored)
  + ImageSets/Segmentation/SPLIT.txt (without it: every mask in SegmentationClass/). Class names: data.class_names,
  else classes.txt, else VOC's 21 (background + 20 objects).
- COCO JSON: `segmentation` polygons or RLE (compressed or not), rasterised with pycocotools. Classes: "background"
  (class 0, every pixel no annotation covers) + the categories ordered by id; with data.class_names, categories map
  by name, and a list without "background" leaves uncovered pixels out of the loss (ignore). Crowd regions
  (`iscrowd: 1`) are ignore; objects are painted largest first, so a small one on a large one stays visible.
- `datasets`: a saved dataset (or a hub id in the offline cache) with an image column (image / img) and an
  annotation-image column (annotation / label / mask / segmentation_mask / semantic_map / labels) of label ids, as
  scene_parse_150 and the transformers semantic-segmentation example have it. ADE20K's id 0 is "other": read it
  with `reduce_labels` (0 -> ignore, k -> k - 1: the example's `do_reduce_labels`) and the 150 names, or keep it as
  a class by giving 151 names.
- `builtin:mnist-segment[-heldout][:COUNT]`: generated once into the visiontune cache as a mask folder.

Label ids: a file value equal to `ignore_index` is ignore; with `reduce_labels`, 0 is ignore and k is class k - 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.core.errors import DataError
from visiontune.core.images import IMAGE_EXTENSIONS, hf_image_value
from visiontune.core.readers import load_saved_dataset, pick_column, read_text
from visiontune.detect.check import Problem
from visiontune.detect.readers import _coco_images, _load_json, coco_categories, coco_target, pick_classes
from visiontune.segment.check import RawSample, assemble
from visiontune.segment.data import IGNORE_NAME, MaskDataset, Shape

VOC_CLASSES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor"
).split()
SPLITS = {"train": ("train", "training"), "val": ("val", "validation"), "test": ("test", "testing")}
MASK_DIRS = ("masks", "annotations")
IMAGE_COLUMNS = ("image", "img")
MASK_COLUMNS = ("annotation", "label", "mask", "segmentation_mask", "semantic_map", "labels")


@dataclass(frozen=True)
class Options:
    """read_masks' settings, passed to every format reader."""

    class_names: list[str] | None = None
    palette: dict[str, Sequence[int]] | None = None
    ignore_index: int = 255
    on_bad_sample: str = "error"
    max_pixels: int = 0
    reduce_labels: bool = False


# ------------------------------------------------------------------------------------------------ classes


def label_decoding(options: Options, file_names: list[str] | None, origin: str) -> MaskDataset:
    """An empty MaskDataset holding the classes and how masks of label ids (or palette colours) become class ids.
    Without any names (no class_names, no file of names) its class_names stay empty: `infer_names` sets them from
    the ids found."""
    if options.palette:
        names, palette = palette_decoding(options.palette, options.class_names, options.ignore_index)
        return MaskDataset([], names, options.ignore_index, "palette", palette=palette, origin=origin)
    if options.class_names and file_names:
        classes = pick_classes(list(enumerate(file_names)), options.class_names, origin)
        names, index = classes.names, classes.index
    else:  # ids are positions in the names; with no names at all, every 8-bit id is taken (see infer_names)
        names = [str(n) for n in options.class_names or file_names or []]
        index = {k: k for k in range(len(names) or 256) if k != options.ignore_index}
    _check_ignore(names, options.ignore_index)
    shift = 1 if options.reduce_labels else 0
    lut = np.full(max([256, options.ignore_index + 1, *(k + shift + 1 for k in index)]), -1, dtype=np.int64)
    for file_id, class_id in index.items():
        lut[file_id + shift] = class_id
    lut[options.ignore_index] = options.ignore_index
    if options.reduce_labels:
        lut[0] = options.ignore_index
    return MaskDataset([], names, options.ignore_index, "ids", lut=lut, origin=origin)


def _check_ignore(names: list[str], ignore_index: int) -> None:
    if not 0 <= ignore_index < 1 << 16:
        raise DataError(f"data.ignore_index {ignore_index} is not a mask value (0-65535); 255 is the usual one.")
    if ignore_index < len(names):
        raise DataError(
            f"data.ignore_index {ignore_index} is also the id of class {names[ignore_index]!r}; use another ignore "
            "value (255), or data.reduce_labels for masks whose 0 means unlabelled."
        )


def palette_decoding(
    palette: dict[str, Sequence[int]], class_names: list[str] | None, ignore_index: int
) -> tuple[list[str], dict[int, int]]:
    """The classes (class_names, else the palette's names in order) and packed 0xRRGGBB -> class id; an entry named
    `ignore` marks the ignore colour."""
    names = [str(n) for n in class_names] if class_names else [str(n) for n in palette if n != IGNORE_NAME]
    packed: dict[int, int] = {}
    for name, colour in palette.items():
        try:
            r, g, b = (int(v) for v in colour)
            assert all(0 <= v <= 255 for v in (r, g, b))
        except (TypeError, ValueError, AssertionError):
            raise DataError(
                f"data.palette.{name} is {colour!r}; give each class its colour as [r, g, b] (0-255)."
            ) from None
        if name != IGNORE_NAME and name not in names:
            raise DataError(f"data.palette names {name!r}, which is not among data.class_names {names}; add it there.")
        key = (r << 16) | (g << 8) | b
        if key in packed:
            raise DataError(f"data.palette gives the colour {[r, g, b]} to two entries; give each its own colour.")
        packed[key] = ignore_index if name == IGNORE_NAME else names.index(name)
    return names, packed


def infer_names(data: MaskDataset) -> MaskDataset:
    """Class names "0".."K" for a set read without names: K is the largest id any mask holds."""
    if data.class_names:
        return data
    if not data.pixel_counts:
        raise DataError(f"No mask of {data.origin} holds a class id (all ignore); give data.class_names.")
    return replace(data, class_names=[str(k) for k in range(len(data.pixel_counts))])


def _names_file(folder: Path) -> list[str] | None:
    """classes.txt: one class name per line, line k naming id k."""
    file = folder / "classes.txt"
    if not file.is_file():
        return None
    return [line.strip() for line in read_text(file).splitlines() if line.strip()]


def _finish(raws: list[RawSample], problems: list[Problem], data: MaskDataset, options: Options, source=None):
    return infer_names(assemble(raws, problems, data, options.on_bad_sample, options.max_pixels, source))


# ------------------------------------------------------------------------------------------------ mask folders


def mask_folders(root: Path, split: str) -> tuple[Path, Path] | None:
    """(images folder, masks folder) of `split` under root, or None if root is not a mask folder."""
    for name in SPLITS.get(split, (split,)):
        for masks in MASK_DIRS:
            for images, found in (
                (root / name / "images", root / name / masks),
                (root / "images" / name, root / masks / name),
            ):
                if images.is_dir() and found.is_dir():
                    return images, found
    for masks in MASK_DIRS:
        if (root / "images").is_dir() and (root / masks).is_dir():
            return root / "images", root / masks
    return None


def read_folder(root: Path, split: str, options: Options) -> MaskDataset:
    images_dir, masks_dir = mask_folders(root, split) or (root / "images", root / "masks")
    masks = {p.relative_to(masks_dir).with_suffix(""): p for p in _files(masks_dir)}
    raws, problems = [], []
    for image in _files(images_dir):
        key = image.relative_to(images_dir).with_suffix("")
        raws.append(RawSample(str(image), str(masks.pop(key, masks_dir / key.with_suffix(".png")))))
    for mask in masks.values():
        problems.append(Problem(-1, str(mask), f"has no image (no {images_dir / mask.relative_to(masks_dir).stem}.*)"))
    data = label_decoding(options, _names_file(root), str(root))
    return _finish(raws, problems, data, options)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# ------------------------------------------------------------------------------------------------ VOC


def read_voc(root: Path, split: str, options: Options) -> MaskDataset:
    listed = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if listed.is_file():
        ids = [line.split()[0] for line in read_text(listed).splitlines() if line.strip()]
    else:
        ids = [p.stem for p in sorted((root / "SegmentationClass").glob("*.png"))]
    if not ids:
        raise DataError(f"{root}/SegmentationClass has no .png masks; put one mask per image there.")
    raws = [RawSample(str(_voc_image(root, i)), str(root / "SegmentationClass" / f"{i}.png")) for i in ids]
    names = _names_file(root) or VOC_CLASSES
    data = label_decoding(options, names, f"{root} ({split})")
    return _finish(raws, [], data, options)


def _voc_image(root: Path, stem: str) -> Path:
    found = sorted(p for p in (root / "JPEGImages").glob(f"{stem}.*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return found[0] if found else root / "JPEGImages" / f"{stem}.jpg"


# ------------------------------------------------------------------------------------------------ COCO


def read_coco(path: Path, image_root: str | None, options: Options) -> MaskDataset:
    coco = _load_json(path)
    root = Path(image_root).expanduser() if image_root else path.parent
    file_classes = coco_categories(coco, path)
    names = [name for _, name in file_classes]
    wanted = options.class_names or (names if "background" in names else ["background", *names])
    classes = pick_classes(file_classes, wanted, str(path))
    _check_ignore(classes.names, options.ignore_index)
    images, by_id = _coco_images(coco, path, root)
    problems: list[Problem] = []
    shapes: dict[int, list[tuple[bool, float, Shape]]] = {k: [] for k in range(len(images))}
    for k, ann in enumerate(coco.get("annotations") or []):
        found = coco_target(k, ann, path, images, by_id, classes, problems)
        if found is None:
            continue
        ann, ref, image, label = found
        crowd, segmentation = bool(ann.get("iscrowd", 0)), ann.get("segmentation")
        reason = _shape_problem(segmentation)
        if reason:
            problems.append(Problem(image, ref, reason))
        elif label is not None:
            shape = Shape(options.ignore_index if crowd else label, segmentation, float(ann.get("area") or 0))
            shapes[image].append((crowd, shape.area, shape))
    keys = [f"{path}#{k}" for k in range(len(images))]
    raws = [
        RawSample(raw.image, key, declared=raw.declared, image_ref=raw.source, mask_ref=f"{raw.source} shapes")
        for raw, key in zip(images, keys, strict=True)
    ]
    # Crowd (ignore) first, then objects largest first: painting in this order keeps small objects on top.
    ordered = {key: [s for *_, s in sorted(shapes[k], key=lambda t: (not t[0], -t[1]))] for k, key in enumerate(keys)}
    fill = classes.names.index("background") if "background" in classes.names else options.ignore_index
    data = MaskDataset([], classes.names, options.ignore_index, "coco", shapes=ordered, fill=fill, origin=str(path))
    return _finish(raws, problems, data, options)


def _shape_problem(segmentation: Any) -> str | None:
    """Why a COCO `segmentation` cannot be rendered, or None. A 4-number polygon is refused: pycocotools would
    read it as a box."""
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if not (isinstance(size, list) and len(size) == 2 and "counts" in segmentation):
            return "has an RLE segmentation without `size` [height, width] and `counts`"
        return None
    if not isinstance(segmentation, list) or not segmentation:
        return "has no `segmentation` (polygons or RLE); a box alone gives no mask"
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            return "has a polygon that is not [x1, y1, x2, y2, x3, y3, ...] (at least 3 points)"
        if not all(isinstance(v, int | float) for v in polygon):
            return "has a polygon with a coordinate that is not a number"
    return None


# ------------------------------------------------------------------------------------------------ datasets


def read_hf(path: str | Path, split: str, options: Options) -> MaskDataset:
    import datasets

    ds = load_saved_dataset(path, split)
    image_col = pick_column(ds, IMAGE_COLUMNS, path, "name the image column `image`")
    mask_col = pick_column(ds, MASK_COLUMNS, path, "name the annotation-image column `annotation`")
    for column in (image_col, mask_col):  # keep bytes: headers are probed, pixels decoded once
        if isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    raws = [
        RawSample(
            f"{path}[{i}]", f"{path}[{i}]", row=i, image_ref=f"{path} row {i}", mask_ref=f"{path} row {i} {mask_col}"
        )
        for i in range(len(ds))
    ]
    data = label_decoding(options, None, str(path))
    data = replace(data, hf_dataset=ds, image_column=image_col, mask_column=mask_col)
    return _finish(raws, [], data, options, lambda i: hf_image_value(ds, i, image_col))


# ------------------------------------------------------------------------------------------------ builtin


_BUILTIN = re.compile(r"mnist-segment(-heldout)?(?::(\d+))?")


def read_builtin(spec: str, options: Options) -> MaskDataset:
    """`builtin:mnist-segment[-heldout][:COUNT]`: generated once into the visiontune cache, then read as a mask
    folder."""
    from visiontune.core.assets import get_asset
    from visiontune.segment.mnist_segment import mnist_segment_dir

    name = spec.removeprefix("builtin:")
    match = _BUILTIN.fullmatch(name)
    if match is None:
        get_asset(name.partition(":")[0], "dataset")  # names the built-in datasets if the name is unknown
        raise DataError(
            f"{spec} is not a segmentation set; use builtin:mnist-segment or builtin:mnist-segment-heldout."
        )
    folder = mnist_segment_dir(bool(match.group(1)), int(match.group(2)) if match.group(2) else None)
    return replace(read_folder(folder, "train", options), origin=spec)
