"""Format readers behind detect/data.py:read_boxes. Each turns its files into `RawImage`s (boxes in the file's own
frame) plus the problems found while parsing; `assemble` probes every image header, puts the boxes into the frame
of the displayed image, checks them and applies data.on_bad_sample.

- COCO JSON: `images` / `annotations` (bbox xywh) / `categories` (ids need not be contiguous; classes ordered by
  id). `iscrowd: 1` is kept as a crowd region. File names are relative to `image_root` (default: the JSON's folder).
  Read with masks (detector maskrcnn), every annotation's `segmentation` (polygons, RLE, crowd RLE) is checked
  (detect/masks.py) and kept with its box. YOLO polygon lines and a `datasets` `objects.segmentation` give masks too;
  VOC holds boxes only.
- YOLO: `data.yaml` with `names` (list or {id: name}), optional `path` (relative to the yaml) and `train`/`val`/
  `test`: image folders, `.txt` lists of images, or lists of those. An image's labels are at the same path with the
  last `images` folder renamed `labels` and the suffix `.txt` (Ultralytics' rule); no label file = a negative. A line
  is `class cx cy w h` in fractions of the image, or `class x1 y1 x2 y2 ...` (a polygon; its bounding box is used).
- Pascal VOC: Annotations/*.xml (+ ImageSets/Main/SPLIT.txt when present) with images in JPEGImages/; pixel
  coordinates are 1-based inclusive, read as xyxy (xmin - 1, ymin - 1, xmax, ymax); `difficult` objects become crowd
  regions (ignored in evaluation, not trained); classes are the object names, sorted.
- `datasets`: a saved dataset with an image column and an `objects` column of {bbox (COCO xywh), category}, as in
  the transformers object-detection example; names from the category's ClassLabel.

EXIF: the pixels are shown (and trained) as `ImageOps.exif_transpose` displays them. YOLO fractions and `datasets`
boxes (whose images `datasets` itself transposes) are taken in that displayed frame. COCO and VOC files state the
image size: when it matches the displayed size the boxes are taken as they are; when it matches only the stored
size (an annotator that ignored the EXIF tag), the boxes are rotated/flipped with the pixels.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from visiontune.core.errors import DataError
from visiontune.core.images import IMAGE_EXTENSIONS
from visiontune.core.readers import load_saved_dataset, pick_column, read_text
from visiontune.detect.check import ImageInfo, Problem, check_box, probe_images, settle
from visiontune.detect.data import Box, BoxDataset, BoxRecord
from visiontune.detect.masks import segmentation_problem


@dataclass
class RawAnn:
    ref: str  # file + annotation, for messages
    box: Box  # xyxy: absolute pixels as the file states them, or fractions of the image (RawImage.normalized)
    label: int
    crowd: bool = False
    segmentation: Any = None  # COCO polygons / RLE, when the set is read with masks


@dataclass
class RawImage:
    image: str  # path, or DATASET[ROW]
    source: str  # the image as the annotation file names it, for messages
    anns: list[RawAnn] = field(default_factory=list)
    declared: tuple[int, int] | None = None  # (width, height) the annotation file states
    normalized: bool = False  # YOLO: boxes in fractions of the displayed image
    row: int | None = None  # `datasets` row


@dataclass
class Classes:
    """The class list and how a file's category ids (or names) map onto it."""

    names: list[str]
    category_ids: list[int]
    index: dict[Any, int]  # the file's category id or name -> class index
    file_names: dict[Any, str] = field(default_factory=dict)  # the file's category id -> its name

    def lookup(self, key: Any, ref: str, problems: list[Problem], image: int) -> int | None:
        if key in self.index:
            return self.index[key]
        shown = self.file_names.get(key)
        what = f"category {key!r}" + (f" ({shown!r})" if shown is not None and shown != key else "")
        problems.append(Problem(image, ref, f"has {what}, which is not among the classes {self.names}"))
        return None


def pick_classes(file_classes: list[tuple[Any, str]], class_names: list[str] | None, where: str) -> Classes:
    """The classes: the file's (id, name) pairs in their order, or `class_names` (the ids then map by name)."""
    names = [name for _, name in file_classes]
    _unique(names, where)
    file_names = dict(file_classes)
    if not class_names:
        index = {i: k for k, (i, _) in enumerate(file_classes)}
        return Classes(names, [int(i) for i, _ in file_classes], index, file_names)
    wanted = [str(n) for n in class_names]
    _unique(wanted, "data.class_names")
    by_name = {name: i for i, name in file_classes}
    index = {i: wanted.index(name) for i, name in file_classes if name in wanted}
    return Classes(wanted, [int(by_name[n]) if n in by_name else -1 for n in wanted], index, file_names)


def _unique(names: list[str], where: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{where}: class names {dupes} appear more than once; give each class its own name.")


# ------------------------------------------------------------------------------------------------ assemble


def assemble(
    raws: list[RawImage],
    problems: list[Problem],
    classes: Classes,
    on_bad_sample: str,
    origin: str,
    max_pixels: int,
    image_source: Callable[[int], Any] | None = None,
    hf_dataset: Any = None,
    image_column: str | None = None,
    masks: bool = False,
) -> BoxDataset:
    """Probe every image, bring its boxes into the displayed frame, check them (and each object's mask with
    `masks`), apply data.on_bad_sample."""
    if not raws:
        raise DataError(f"{origin} lists no images; point the data key at a set with images.")
    infos = probe_images(len(raws), image_source or (lambda i: raws[i].image), max_pixels)
    records: list[BoxRecord | None] = []
    for i, (raw, info) in enumerate(zip(raws, infos, strict=True)):
        if isinstance(info, str):
            problems.append(Problem(i, raw.source, info))
            records.append(None)
            continue
        records.append(_record(i, raw, info, problems))
    dropped, skipped = settle(problems, on_bad_sample, origin, len(raws))
    kept = [r for i, r in enumerate(records) if r is not None and i not in dropped]
    if masks:
        kept = [replace(r, segments=r.segments or []) for r in kept]
    return BoxDataset(kept, classes.names, classes.category_ids, skipped, origin, hf_dataset, image_column)


def _record(i: int, raw: RawImage, info: ImageInfo, problems: list[Problem]) -> BoxRecord | None:
    width, height = info.displayed
    turn = _frame(raw, info, i, problems)
    if turn is None:
        return None
    boxes, labels, crowd, segments = [], [], [], []
    frame = info.stored if turn else info.displayed  # where the file draws its shapes
    for ann in raw.anns:
        box, shape = ann.box, ann.segmentation
        if raw.normalized:
            box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
            if shape is not None:  # a YOLO polygon, in fractions of the displayed image
                shape = [[v * (width, height)[k % 2] for k, v in enumerate(polygon)] for polygon in shape]
        elif turn:
            box = exif_box(box, info.orientation, *info.stored)
        box, reason = check_box(box, width, height)
        if not reason and shape is not None:
            reason = segmentation_problem(shape, *frame)
        if reason:
            problems.append(Problem(i, ann.ref, reason))
            continue
        boxes.append(box)
        labels.append(ann.label)
        crowd.append(ann.crowd)
        segments.append(shape)
    shapes = segments if any(s is not None for s in segments) else None
    turned = info.orientation if turn else 1
    return BoxRecord(raw.image, boxes, labels, crowd, width, height, raw.source, raw.row, shapes, turned)


def _frame(raw: RawImage, info: ImageInfo, i: int, problems: list[Problem]) -> bool | None:
    """Whether the boxes must be turned with the pixels (the file states the stored size, not the displayed one);
    None with a problem when the stated size is neither."""
    if raw.declared is None or raw.declared == info.displayed:
        return False
    if raw.declared == info.stored:
        return True
    shown = f"{info.displayed[0]}x{info.displayed[1]}" + (" as displayed" if info.orientation != 1 else "")
    problems.append(
        Problem(i, raw.source, f"states the image is {raw.declared[0]}x{raw.declared[1]} but {raw.image} is {shown}")
    )
    return None


def exif_box(box: Box, orientation: int, width: int, height: int) -> Box:
    """A box on the stored pixels (width x height) moved with them by `ImageOps.exif_transpose`."""
    w, h = width, height
    move = {
        2: lambda x, y: (w - x, y),  # mirrored left-right
        3: lambda x, y: (w - x, h - y),  # rotated 180
        4: lambda x, y: (x, h - y),  # mirrored top-bottom
        5: lambda x, y: (y, x),  # transposed
        6: lambda x, y: (h - y, x),  # displayed turned 90 degrees clockwise
        7: lambda x, y: (h - y, w - x),  # transversed
        8: lambda x, y: (y, w - x),  # displayed turned 90 degrees anticlockwise
    }.get(orientation)
    if move is None:
        return box
    (ax, ay), (bx, by) = move(box[0], box[1]), move(box[2], box[3])
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))


# ------------------------------------------------------------------------------------------------ COCO


def read_coco(
    path: Path,
    class_names: list[str] | None,
    on_bad_sample: str,
    image_root: str | None,
    max_pixels: int,
    masks: bool = False,
) -> BoxDataset:
    coco = _load_json(path)
    root = Path(image_root).expanduser() if image_root else path.parent
    classes = pick_classes(coco_categories(coco, path), class_names, str(path))
    raws, by_id = _coco_images(coco, path, root)
    annotations = coco.get("annotations") or []
    if masks and not any(isinstance(a, dict) and a.get("segmentation") for a in annotations):
        raise DataError(
            f"{path} has no `segmentation` in any annotation, but detector maskrcnn learns each object's mask; add "
            "polygons or RLE to the annotations, or use a box detector (detector: faster_rcnn)."
        )
    problems: list[Problem] = []
    for k, ann in enumerate(annotations):
        _coco_annotation(k, ann, path, raws, by_id, classes, problems, masks)
    return assemble(raws, problems, classes, on_bad_sample, str(path), max_pixels, masks=masks)


def coco_categories(coco: dict, path: Path) -> list[tuple[Any, str]]:
    """The file's (category id, name) pairs, ordered by id (shared with segmentation's COCO reader)."""
    file_classes = []
    for k, cat in enumerate(_coco_list(coco, "categories", path)):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataError(f"{path} category {k} has no `id`; write each category as {{'id': 1, 'name': 'cat'}}.")
        file_classes.append((cat["id"], str(cat.get("name", cat["id"]))))
    if len({i for i, _ in file_classes}) != len(file_classes):
        raise DataError(f"{path} lists a category id more than once; give each category its own id.")
    return sorted(file_classes, key=lambda c: c[0])


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a COCO file (a JSON object with images, annotations and categories).")
    return data


def _coco_list(coco: dict, key: str, path: Path) -> list:
    value = coco.get(key)
    if not isinstance(value, list) or not value:
        raise DataError(f"{path} has no `{key}` list; a COCO detection file needs images, annotations, categories.")
    return value


def _coco_images(coco: dict, path: Path, root: Path) -> tuple[list[RawImage], dict[Any, int]]:
    raws, by_id = [], {}
    for k, entry in enumerate(_coco_list(coco, "images", path)):
        if not isinstance(entry, dict) or "id" not in entry or not entry.get("file_name"):
            raise DataError(f"{path} image {k} needs `id` and `file_name`; fix that entry.")
        if entry["id"] in by_id:
            raise DataError(f"{path} lists image id {entry['id']} twice; give each image its own id.")
        by_id[entry["id"]] = len(raws)
        file = root / str(entry["file_name"])
        raws.append(RawImage(str(file), f"{path} image {entry['id']} ({file})", declared=_declared(entry)))
    return raws, by_id


def _declared(entry: dict) -> tuple[int, int] | None:
    try:
        w, h = int(entry.get("width") or 0), int(entry.get("height") or 0)
    except (TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def _coco_annotation(
    k: int,
    ann: Any,
    path: Path,
    raws: list[RawImage],
    by_id: dict,
    classes: Classes,
    problems: list[Problem],
    masks: bool = False,
) -> None:
    found = coco_target(k, ann, path, raws, by_id, classes, problems)
    if found is None:
        return
    ann, ref, image, label = found
    box = _xywh(ann.get("bbox"))
    shape = (ann.get("segmentation") or []) if masks else None  # [] is refused by segmentation_problem
    if box is None:
        problems.append(Problem(image, ref, f"has bbox {ann.get('bbox')!r}, not [x, y, width, height]"))
    elif label is not None:
        raws[image].anns.append(RawAnn(ref, box, label, bool(ann.get("iscrowd", 0)), shape))


def coco_target(
    k: int, ann: Any, path: Path, raws: list, by_id: dict, classes: Classes, problems: list[Problem]
) -> tuple[dict, str, int, int | None] | None:
    """(annotation, its name for messages, its image's index, its class or None) for annotation k; None with a
    problem when its image is not in `images`. `raws`: anything with `.image` (shared with segmentation)."""
    ann = ann if isinstance(ann, dict) else {}
    ref = f"{path} annotation {ann.get('id', k)}"
    image = by_id.get(ann.get("image_id"), -1)
    if image < 0:
        problems.append(Problem(-1, ref, f"refers to image id {ann.get('image_id')!r}, which is not in `images`"))
        return None
    ref += f" (image {Path(raws[image].image).name})"
    return ann, ref, image, classes.lookup(ann.get("category_id"), ref, problems, image)


def _xywh(value: Any) -> Box | None:
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (x, y, x + w, y + h)


# ------------------------------------------------------------------------------------------------ YOLO


def read_yolo(
    path: Path, split: str, class_names: list[str] | None, on_bad_sample: str, max_pixels: int, masks: bool = False
) -> BoxDataset:
    spec = _load_yaml(path)
    names = spec.get("names")
    if isinstance(names, list):
        file_classes = list(enumerate(str(n) for n in names))
    elif isinstance(names, dict):
        file_classes = sorted((int(i), str(n)) for i, n in names.items())
    else:
        raise DataError(f"{path} has no `names`; list the class names (names: [cat, dog]) in it.")
    classes = pick_classes(file_classes, class_names, str(path))
    root = (path.parent / str(spec.get("path") or ".")).expanduser()
    if split not in spec or not spec[split]:
        given = [k for k in ("train", "val", "test") if spec.get(k)]
        raise DataError(f"{path} has no `{split}` images (it has {given}); add `{split}: images/{split}` to it.")
    images, label_dirs = _yolo_images(spec[split], root, path, split)
    raws, problems = [], []
    for image in images:
        raws.append(_yolo_labels(image, len(raws), classes, problems, masks))
    _orphan_labels(images, label_dirs, problems)
    return assemble(raws, problems, classes, on_bad_sample, f"{path} ({split})", max_pixels, masks=masks)


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        spec = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise DataError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the file.") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path} is not a YOLO data.yaml (names, train, val); see the Ultralytics dataset format.")
    return spec


def _yolo_images(value: Any, root: Path, path: Path, split: str) -> tuple[list[Path], list[Path]]:
    """The images of a split entry (folders, .txt lists, or a list of them) and the label folders to look for
    orphan label files in."""
    images, label_dirs = [], []
    for entry in value if isinstance(value, list) else [value]:
        where = (root / str(entry)).expanduser()
        if where.is_dir():
            images += sorted(p for p in where.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            label_dirs.append(Path(_label_path(where / "x.txt").parent))
        elif where.is_file() and where.suffix.lower() == ".txt":
            lines = [line.strip() for line in read_text(where).splitlines() if line.strip()]
            images += [(where.parent / line).resolve() for line in lines]
        else:
            raise DataError(f"{path}: {split} entry {entry!r} is neither a folder nor a .txt list under {root}.")
    return images, label_dirs


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `/images/` in the path becomes `/labels/`, the suffix `.txt`."""
    text, sep = str(image), os.sep
    head, found, tail = text.rpartition(f"{sep}images{sep}")
    return Path((head + f"{sep}labels{sep}" + tail) if found else text).with_suffix(".txt")


def _yolo_labels(image: Path, index: int, classes: Classes, problems: list[Problem], masks: bool) -> RawImage:
    label_file = _label_path(image)
    raw = RawImage(str(image), str(image), normalized=True)
    if not label_file.is_file():
        return raw  # no label file: a negative, as in Ultralytics
    for n, line in enumerate(read_text(label_file).splitlines(), start=1):
        if line.strip():
            _yolo_line(line.split(), f"{label_file} line {n}", raw, index, classes, problems, masks)
    return raw


def _yolo_line(
    values: list[str], ref: str, raw: RawImage, index: int, classes: Classes, problems: list, masks: bool = False
) -> None:
    try:
        cls, coords = int(float(values[0])), [float(v) for v in values[1:]]
    except ValueError:
        problems.append(Problem(index, ref, f"is not numbers ({' '.join(values)!r}); write `class cx cy w h`"))
        return
    if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
        problems.append(Problem(index, ref, f"has {len(values)} values; a YOLO box line is `class cx cy w h`"))
        return
    outside = [v for v in coords if not 0.0 <= v <= 1.0]
    if outside:
        problems.append(Problem(index, ref, f"has the coordinate {outside[0]:g} outside 0-1 (YOLO uses fractions)"))
        return
    label = classes.lookup(cls, ref, problems, index)
    if label is None:
        return
    if len(coords) == 4 and masks:
        problems.append(Problem(index, ref, "is a box line; detector maskrcnn needs polygon lines `class x1 y1 ...`"))
        return
    if len(coords) == 4:
        cx, cy, w, h = coords
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    else:  # a polygon (YOLO segmentation labels): its bounding box, and its mask when masks are read
        box = (min(coords[0::2]), min(coords[1::2]), max(coords[0::2]), max(coords[1::2]))
    raw.anns.append(RawAnn(ref, box, label, segmentation=[coords] if masks else None))


def _orphan_labels(images: list[Path], label_dirs: list[Path], problems: list[Problem]) -> None:
    have = {_label_path(p) for p in images}
    for folder in label_dirs:
        for label in sorted(folder.rglob("*.txt")) if folder.is_dir() else []:
            if label not in have and label.name != "classes.txt":  # classes.txt: LabelImg's class list
                problems.append(Problem(-1, str(label), f"has no image (no {label.stem}.* among the images)"))


# ------------------------------------------------------------------------------------------------ VOC


def read_voc(root: Path, split: str, class_names: list[str] | None, on_bad_sample: str, max_pixels: int) -> BoxDataset:
    files = _voc_files(root, split)
    parsed, problems = [], []
    for k, xml in enumerate(files):
        parsed.append(_voc_parse(xml, root, k, problems))
    found = sorted({obj[0] for _, objs in parsed for obj in objs} | _voc_names(root, files))
    classes = pick_classes(list(enumerate(found)), class_names, str(root))
    classes.index = {name: classes.index[i] for i, name in enumerate(found) if i in classes.index}
    raws = []
    for k, (raw, objs) in enumerate(parsed):
        for name, box, difficult, ref in objs:
            label = classes.lookup(name, ref, problems, k)
            if label is not None:
                raw.anns.append(RawAnn(ref, box, label, difficult))
        raws.append(raw)
    if not class_names:
        classes.category_ids = list(range(len(classes.names)))
    return assemble(raws, problems, classes, on_bad_sample, f"{root} ({split})", max_pixels)


def _voc_names(root: Path, read: list[Path]) -> set[str]:
    """The object names of the XML files outside this split, so train and val get the same class list."""
    names: set[str] = set()
    for xml in sorted(set((root / "Annotations").glob("*.xml")) - set(read)):
        try:
            names |= {(n.text or "").strip() for n in ET.fromstring(read_text(xml)).iterfind("object/name")}
        except ET.ParseError:
            continue  # reported when the split holding it is read
    return names - {""}


def _voc_files(root: Path, split: str) -> list[Path]:
    listed = root / "ImageSets" / "Main" / f"{split}.txt"
    if listed.is_file():
        ids = [line.split()[0] for line in read_text(listed).splitlines() if line.strip()]
        return [root / "Annotations" / f"{i}.xml" for i in ids]
    files = sorted((root / "Annotations").glob("*.xml"))
    if not files:
        raise DataError(f"{root}/Annotations has no .xml files; put one Pascal VOC XML per image there.")
    return files


def _voc_parse(xml: Path, root: Path, k: int, problems: list[Problem]) -> tuple[RawImage, list]:
    try:
        tree = ET.fromstring(read_text(xml))
    except (ET.ParseError, FileNotFoundError) as err:
        reason = "is missing" if isinstance(err, FileNotFoundError) else f"is not valid XML ({err})"
        problems.append(Problem(k, str(xml), reason))
        return RawImage(str(_voc_image(root, xml.stem, None)), str(xml)), []
    image = _voc_image(root, xml.stem, tree.findtext("filename"))
    size = tree.find("size")
    declared = _declared({t: size.findtext(t) for t in ("width", "height")}) if size is not None else None
    raw = RawImage(str(image), f"{xml} ({image.name})", declared=declared)
    objs = []
    for n, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        ref = f"{xml} object {n} ({name or 'no name'})"
        box = _voc_box(obj.find("bndbox"))
        if not name or box is None:
            problems.append(Problem(k, ref, "needs a <name> and a <bndbox> of xmin ymin xmax ymax"))
            continue
        objs.append((name, box, (obj.findtext("difficult") or "0").strip() == "1", ref))
    return raw, objs


def _voc_image(root: Path, stem: str, filename: str | None) -> Path:
    folder = root / "JPEGImages"
    if filename and (folder / filename.strip()).is_file():
        return folder / filename.strip()
    found = sorted(p for p in folder.glob(f"{stem}.*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return found[0] if found else folder / (filename.strip() if filename else f"{stem}.jpg")


def _voc_box(node: ET.Element | None) -> Box | None:
    try:
        x0, y0, x1, y1 = (float(node.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
    except (AttributeError, TypeError, ValueError):
        return None
    return (x0 - 1, y0 - 1, x1, y1)  # 1-based inclusive pixels -> continuous xyxy


# ------------------------------------------------------------------------------------------------ datasets


def read_hf(
    path: str | Path,
    split: str,
    class_names: list[str] | None,
    on_bad_sample: str,
    max_pixels: int,
    masks: bool = False,
) -> BoxDataset:
    import datasets

    from visiontune.core.images import hf_image_value

    ds = load_saved_dataset(path, split)
    image_col = pick_column(ds, ("image", "img"), path, "name the image column `image`")
    objects_col = pick_column(ds, ("objects",), path, "give it an `objects` column of {bbox, category}")
    if isinstance(ds.features[image_col], datasets.Image):  # keep bytes: headers are probed, pixels decoded later
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    names = _hf_category_names(ds.features[objects_col])
    rows = ds[objects_col]
    if names is None:
        found = sorted({int(c) for obj in rows for c in _hf_objects(obj)[1]})
        names = [str(c) for c in found]
        file_classes = list(zip(found, names, strict=True))
    else:
        file_classes = list(enumerate(names))
    classes = pick_classes(file_classes, class_names, str(path))
    if masks and not any(any(_hf_objects(obj)[2]) for obj in rows):
        raise DataError(
            f"{path} has no `segmentation` in its `{objects_col}`, but detector maskrcnn learns each object's mask; "
            "add COCO polygons or RLE per object, or use a box detector (detector: faster_rcnn)."
        )
    raws, problems = [], []
    for i, obj in enumerate(rows):
        raw = RawImage(f"{path}[{i}]", f"{path} row {i}", row=i)
        for n, (bbox, category, shape) in enumerate(zip(*_hf_objects(obj), strict=False)):
            ref = f"{path} row {i} object {n}"
            label, box = classes.lookup(category, ref, problems, i), _xywh(bbox)
            if box is None:
                problems.append(Problem(i, ref, f"has bbox {bbox!r}, not [x, y, width, height]"))
            elif label is not None:
                raw.anns.append(RawAnn(ref, box, label, segmentation=(shape or []) if masks else None))
        raws.append(raw)
    source = lambda i: hf_image_value(ds, i, image_col)  # noqa: E731
    return assemble(raws, problems, classes, on_bad_sample, str(path), max_pixels, source, ds, image_col, masks)


def _hf_category_names(feature: Any) -> list[str] | None:
    """The ClassLabel names of `objects.category`, however `datasets` nests the feature (dict of lists, list of
    dicts)."""
    inner = getattr(feature, "feature", feature)
    if isinstance(inner, list) and inner:
        inner = inner[0]
    if isinstance(inner, dict) and "category" in inner:
        category = inner["category"]
        category = getattr(category, "feature", category)
        return list(category.names) if hasattr(category, "names") else None
    return None


def _hf_objects(obj: Any) -> tuple[list, list, list]:
    """(bboxes, categories, segmentations or Nones) of one row's `objects`, stored as {bbox: [...], category: [...],
    segmentation: [...]} or [{bbox, category, segmentation}]."""
    if isinstance(obj, dict):
        boxes = list(obj.get("bbox") or [])
        return boxes, list(obj.get("category") or []), list(obj.get("segmentation") or [None] * len(boxes))
    objects = obj or []
    return (
        [o.get("bbox") for o in objects],
        [o.get("category") for o in objects],
        [o.get("segmentation") for o in objects],
    )


# ------------------------------------------------------------------------------------------------ builtin


_BUILTIN = re.compile(r"mnist-detect(-heldout)?(?::(\d+))?")


def read_builtin(
    spec: str, class_names: list[str] | None, on_bad_sample: str, max_pixels: int, masks: bool = False
) -> BoxDataset:
    """`builtin:mnist-detect[-heldout][:COUNT]`: generated once into the visiontune cache, then read as COCO."""
    from visiontune.core.assets import get_asset
    from visiontune.detect.mnist_detect import mnist_detect_dir

    name = spec.removeprefix("builtin:")
    match = _BUILTIN.fullmatch(name)
    if match is None:
        get_asset(name.partition(":")[0], "dataset")  # names the built-in datasets if the name is unknown
        raise DataError(f"{spec} is not a detection set; use builtin:mnist-detect or builtin:mnist-detect-heldout.")
    heldout, count = bool(match.group(1)), int(match.group(2)) if match.group(2) else None
    folder = mnist_detect_dir(heldout, count)
    data = read_coco(folder / "annotations.json", class_names, on_bad_sample, None, max_pixels, masks)
    data.origin = spec
    return data
