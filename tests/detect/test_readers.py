"""Detection readers: the same generated set read from COCO, YOLO, VOC and a `datasets` folder; class ids and
names; crowd and difficult regions; negatives; every kind of bad annotation; EXIF orientation; split; Dataset."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from visiontune.core.errors import DataError
from visiontune.detect.data import BoxDataset, read_boxes, split_boxes
from visiontune.detect.dataset import DetectionDataset, detection_collate
from visiontune.detect.readers import exif_box
from visiontune.testing.detect_fixtures import CLASSES, COCO_IDS, detection_samples


@pytest.fixture
def copy(box_sets, tmp_path):
    """A private copy of the generated box_sets, for tests that damage them."""
    root = next(iter(box_sets.values())).parent.parent
    shutil.copytree(root, tmp_path / "box_sets")
    return {key: tmp_path / "box_sets" / path.relative_to(root) for key, path in box_sets.items()}


def _read(box_sets: dict[str, Path], form: str, split: str = "train", **kw) -> BoxDataset:
    if form == "coco":
        return read_boxes(str(box_sets[f"coco-{split}"]), **kw)
    return read_boxes(str(box_sets[form]), split=split, **kw)


def _content(data: BoxDataset) -> list:
    """Records as comparable content, by image name: (size, sorted (label, rounded box, crowd))."""
    return sorted(
        (
            Path(r.image).stem,
            r.width,
            r.height,
            sorted(
                (lab, tuple(round(v, 3) for v in box), c)
                for box, lab, c in zip(r.boxes, r.labels, r.iscrowd, strict=True)
            ),
        )
        for r in data.records
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_same_set_read_from_every_format(box_sets, split):
    samples = detection_samples()
    read = {form: _read(box_sets, form, split) for form in ("coco", "yolo", "voc")}
    expected = _content(read["coco"])
    for form, data in read.items():
        assert data.class_names == CLASSES, form
        assert _content(data) == expected, form
    assert read["coco"].category_ids == COCO_IDS  # not contiguous: kept as the file has them
    assert read["yolo"].category_ids == read["voc"].category_ids == [0, 1, 2]
    first = int(Path(read["voc"].records[0].image).stem.split("_")[1])
    assert read["voc"].records[0].boxes == [tuple(float(v) for v in b) for b in samples[first][1]]
    negatives = [r for r in read["coco"].records if not r.boxes]
    assert negatives and all(not r.labels and not r.iscrowd for r in negatives)


def test_datasets_objects_column(box_sets, tmp_path):
    datasets = pytest.importorskip("datasets")
    coco = _read(box_sets, "coco")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=CLASSES),
                }
            ),
        }
    )
    rows = {
        "image": [Image.open(r.image) for r in coco.records],
        "objects": [
            {"bbox": [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in r.boxes], "category": r.labels}
            for r in coco.records
        ],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "hf")
    data = read_boxes(str(tmp_path / "hf"))
    assert data.class_names == CLASSES and len(data) == len(coco)
    assert [(r.boxes, r.labels, r.width, r.height) for r in data.records] == [
        (r.boxes, r.labels, r.width, r.height) for r in coco.records
    ]
    image, target = DetectionDataset(data, None, 10**8)[1]
    assert image.shape == (3, coco.records[1].height, coco.records[1].width)
    assert target["boxes"].tolist() == [list(b) for b in coco.records[1].boxes]


def test_class_names_reorder_and_refuse_unknown(box_sets):
    data = _read(box_sets, "coco", class_names=["red", "green", "blue"])
    plain = _read(box_sets, "coco")
    assert data.category_ids == [11, 7, 3]
    assert [[2 - lab for lab in r.labels] for r in data.records] == [r.labels for r in plain.records]
    unknown = r"annotation 3 \(image img_002.png\) has category 3 \('blue'\), which is not among the classes \['red'"
    with pytest.raises(DataError, match=unknown):
        _read(box_sets, "coco", class_names=["red", "green"])
    assert _read(box_sets, "yolo", class_names=["red", "green", "blue"]).category_ids == [2, 1, 0]


def test_crowd_and_difficult_are_kept_as_crowd_regions(copy):
    coco = json.loads(copy["coco-train"].read_text())
    coco["annotations"][0]["iscrowd"] = 1
    copy["coco-train"].write_text(json.dumps(coco))
    record = next(r for r in _read(copy, "coco").records if r.boxes)
    assert record.iscrowd[0] and not any(record.iscrowd[1:])
    xml = copy["voc"] / "Annotations" / "img_000.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    record = _read(copy, "voc").records[0]
    assert record.iscrowd[0] and record.boxes


def _coco_edit(key: str, edit):
    def apply(box_sets):
        coco = json.loads(box_sets["coco-train"].read_text())
        edit(coco)
        box_sets["coco-train"].write_text(json.dumps(coco))

    return apply


def _ann(field: str, value):
    return lambda coco: coco["annotations"][0].__setitem__(field, value)


def _write(rel: str, text: str):
    return lambda box_sets: (box_sets["yolo"].parent / rel).write_text(text)


def _xml(old: str, new: str):
    def apply(box_sets):
        xml = box_sets["voc"] / "Annotations" / "img_000.xml"
        xml.write_text(xml.read_text().replace(old, new, 1))

    return apply


def _remove(form: str, rel: str):
    return lambda box_sets: (box_sets[form].parent / rel if form == "coco-train" else box_sets[form] / rel).unlink()


BAD = {  # name: (form, damage, words the sentence must hold, whether an image is dropped with skip)
    "coco box outside": ("coco", _coco_edit("a", _ann("bbox", [60, 40, 30, 30])), ["annotation 1", "outside"], 1),
    "coco zero area": ("coco", _coco_edit("a", _ann("bbox", [5, 5, 0, 10])), ["annotation 1", "zero area"], 1),
    "coco unknown category": ("coco", _coco_edit("a", _ann("category_id", 99)), ["annotation 1", "category 99"], 1),
    "coco unknown image id": ("coco", _coco_edit("a", _ann("image_id", 999)), ["annotation 1", "image id 999"], 0),
    "coco bbox not xywh": ("coco", _coco_edit("a", _ann("bbox", [1, 2])), ["annotation 1", "bbox"], 1),
    "coco missing image": ("coco", _remove("coco-train", "images/img_000.png"), ["img_000.png", "missing"], 1),
    "coco size mismatch": (
        "coco",
        _coco_edit("a", lambda c: c["images"][0].__setitem__("width", 100)),
        ["image 100", "states the image is 100x48"],
        1,
    ),
    "yolo coordinate outside": ("yolo", _write("labels/train/img_000.txt", "0 1.2 .5 .1 .1\n"), ["line 1", "0-1"], 1),
    "yolo unknown class": ("yolo", _write("labels/train/img_000.txt", "7 .5 .5 .1 .1\n"), ["line 1", "category 7"], 1),
    "yolo zero area": ("yolo", _write("labels/train/img_000.txt", "0 .5 .5 0 .1\n"), ["line 1", "zero area"], 1),
    "yolo box outside": ("yolo", _write("labels/train/img_000.txt", "0 .95 .5 .5 .1\n"), ["line 1", "outside"], 1),
    "yolo short line": ("yolo", _write("labels/train/img_000.txt", "0 .5 .5\n"), ["line 1", "3 values"], 1),
    "yolo orphan label": ("yolo", _write("labels/train/ghost.txt", "0 .5 .5 .1 .1\n"), ["ghost.txt", "no image"], 0),
    "voc box outside": ("voc", _xml("<xmax>", "<xmax>9"), ["img_000.xml object 0", "outside"], 1),
    "voc bad bndbox": ("voc", _xml("<xmin>", "<xmin>x"), ["img_000.xml object 0", "bndbox"], 1),
    "voc missing image": ("voc", _remove("voc", "JPEGImages/img_000.png"), ["img_000.png", "missing"], 1),
    "voc broken xml": ("voc", _xml("<annotation>", "<annotation"), ["img_000.xml", "not valid XML"], 1),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_annotation_named_or_skipped(copy, case):
    form, damage, words, dropped = BAD[case]
    clean = len(_read(copy, form))
    damage(copy)
    with pytest.raises(DataError) as err:
        _read(copy, form)
    message = str(err.value)
    assert "\n" not in message and "1 bad annotation(s)" in message and "on_bad_sample=skip" in message
    for word in words + [_file_of(copy, form, case)]:
        assert word in message, (word, message)
    data = _read(copy, form, on_bad_sample="skip")
    assert len(data.skipped) == 1 and len(data) == clean - dropped
    assert words[0] in data.skipped[0].ref


def _file_of(box_sets, form: str, case: str) -> str:
    """The file a message must name: the annotation file, or the label / image file of the case."""
    if form == "coco":
        return "img_000.png" if "missing" in case else "train.json"
    if form == "yolo":
        return "ghost.txt" if "orphan" in case else "img_000.txt"
    return "img_000"


def test_errors_list_every_problem_at_once(copy):
    (copy["yolo"].parent / "labels/train/img_000.txt").write_text("0 1.5 .5 .1 .1\n9 .5 .5 .1 .1\n")
    (copy["yolo"].parent / "labels/train/img_001.txt").write_text("0 .5 .5 0 0\n")
    with pytest.raises(DataError, match=r"3 bad annotation\(s\).*img_000.txt line 1.*img_000.txt line 2.*img_001"):
        _read(copy, "yolo")
    data = _read(copy, "yolo", on_bad_sample="skip")
    assert len(data.skipped) == 3 and len(data) == 6


def test_unknown_path_and_pixel_cap(box_sets, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_boxes(str(tmp_path / "nope.json"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="not a detection set"):
        read_boxes(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="over the data.max_image_pixels cap"):
        _read(box_sets, "coco", max_image_pixels=1000)


# ---------------------------------------------------------------------------------------------- EXIF

STORED = (60, 40)  # (width, height) of the pixels as stored
PATCH = (5, 10, 25, 18)  # xyxy on the stored pixels


def _exif_png(orientation: int) -> bytes:
    """A PNG whose stored pixels hold a white patch at PATCH, tagged with an EXIF orientation."""
    pixels = np.zeros((STORED[1], STORED[0], 3), dtype=np.uint8)
    pixels[PATCH[1] : PATCH[3], PATCH[0] : PATCH[2]] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif.tobytes())
    return buffer.getvalue()


def _displayed_patch(data: bytes) -> tuple[float, ...]:
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))[..., 0]
    ys, xs = np.nonzero(shown)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_box_moves_with_the_pixels(orientation):
    assert exif_box(tuple(map(float, PATCH)), orientation, *STORED) == _displayed_patch(_exif_png(orientation))


def _coco_one(tmp_path: Path, size: tuple[int, int], box: tuple) -> Path:
    x0, y0, x1, y1 = box
    coco = {
        "images": [{"id": 1, "file_name": "photo.png", "width": size[0], "height": size[1]}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0]}],
        "categories": [{"id": 1, "name": "patch"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path / "ann.json"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_photo_boxes_follow_the_pixels(tmp_path, orientation):
    data = _exif_png(orientation)
    (tmp_path / "photo.png").write_bytes(data)
    shown = _displayed_patch(data)
    displayed_size = (STORED[1], STORED[0]) if orientation in (6, 8) else STORED
    # Annotated on the displayed image (the file states the displayed size): boxes kept as they are.
    record = read_boxes(str(_coco_one(tmp_path, displayed_size, shown))).records[0]
    assert record.boxes == [shown] and (record.width, record.height) == displayed_size
    # Annotated on the stored pixels (the file states the stored size, an annotator that ignored EXIF): turned.
    if displayed_size != STORED:
        record = read_boxes(str(_coco_one(tmp_path, STORED, PATCH))).records[0]
        assert record.boxes == [shown]
    # YOLO fractions are of the displayed image, as Ultralytics reads them.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "photo.png").write_bytes(data)
    (tmp_path / "labels").mkdir()
    w, h = displayed_size
    cx, cy, bw, bh = (
        (shown[0] + shown[2]) / 2 / w,
        (shown[1] + shown[3]) / 2 / h,
        (shown[2] - shown[0]) / w,
        (shown[3] - shown[1]) / h,
    )
    (tmp_path / "labels" / "photo.txt").write_text(f"0 {cx} {cy} {bw} {bh}\n")
    (tmp_path / "data.yaml").write_text("train: images\nnames: [patch]\n")
    data_set = read_boxes(str(tmp_path))
    assert np.allclose(data_set.records[0].boxes[0], shown)
    # The pixels the Dataset decodes are white exactly inside the box.
    image, target = DetectionDataset(data_set, None, 10**8)[0]
    x0, y0, x1, y1 = (int(round(v)) for v in target["boxes"][0].tolist())
    assert image.shape[1:] == (h, w)
    assert bool((image[:, y0:y1, x0:x1] == 1).all()) and float(image.sum()) == 3 * (x1 - x0) * (y1 - y0)


# ---------------------------------------------------------------------------------------------- split, Dataset


def test_split_boxes_is_seeded_and_disjoint(box_sets):
    data = _read(box_sets, "coco")
    train, val = split_boxes(data, 0.25, seed=3)
    again = split_boxes(data, 0.25, seed=3)
    assert [r.image for r in val.records] == [r.image for r in again[1].records]
    assert len(val) == 2 and len(train) == 6
    assert {r.image for r in train.records} | {r.image for r in val.records} == {r.image for r in data.records}
    assert train.class_names == CLASSES and train.category_ids == COCO_IDS
    with pytest.raises(DataError, match="val_split"):
        split_boxes(data, 0.01, seed=0)


def test_dataset_items_and_collate(box_sets):
    data = _read(box_sets, "voc")
    ds = DetectionDataset(data, None, 10**8)
    items = [ds[i] for i in range(4)]
    images, targets = detection_collate(items)
    assert len(images) == len(targets) == 4
    for i, (image, target) in enumerate(zip(images, targets, strict=True)):
        record = data.records[i]
        assert image.dtype == torch.float32 and image.shape == (3, record.height, record.width)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert target["boxes"].shape == (len(record.boxes), 4) and target["labels"].tolist() == record.labels
        assert target["iscrowd"].dtype == torch.bool and target["image_id"] == i
        assert target["orig_size"] == (record.height, record.width)


def test_truncated_image_found_by_the_decode_check(copy):
    from visiontune.core.check import check_splits
    from visiontune.detect.check import ANNOTATIONS, find_bad_images

    png = copy["voc"] / "JPEGImages" / "img_001.png"
    png.write_bytes(png.read_bytes()[:-40])  # the header still reads: only a full decode finds it
    data = _read(copy, "voc")
    assert len(data) == 8
    with pytest.raises(DataError, match=r"1 bad train annotation\(s\).*img_001.png"):
        check_splits({"train": data}, lambda d: find_bad_images(d, 10**8), "error", ANNOTATIONS)
    kept, bad = check_splits({"train": data}, lambda d: find_bad_images(d, 10**8), "skip", ANNOTATIONS)
    assert len(kept["train"]) == 7 and kept["train"].class_names == CLASSES and bad[0].ref.endswith("img_001.png")
