"""Instance masks of `detector: maskrcnn` data: COCO polygons, compressed and uncompressed RLE and crowd RLE become
each object's mask in step with its box; masks stay on their boxes under every augmentation preset; EXIF-turned
images turn their masks with the pixels; bad shapes and box-only data are refused in one sentence naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.detect.data import read_boxes
from visiontune.detect.dataset import DetectionDataset
from visiontune.detect.masks import decoded, encode, instance_masks
from visiontune.detect.transforms import PRESETS, detection_transforms
from visiontune.testing.detect_fixtures import detection_samples, write_detection_sets


def _mask_box(mask: np.ndarray | torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.asarray(mask))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def test_polygons_rle_and_crowd_become_masks_of_their_rectangles(instance_sets):
    data = read_boxes(str(instance_sets["coco-train"]), masks=True)
    samples = detection_samples(12)
    assert data.has_masks and len(data) == 8
    forms = set()
    coco = json.loads(instance_sets["coco-train"].read_text())
    for ann in coco["annotations"]:
        seg = ann["segmentation"]
        forms.add("polygon" if isinstance(seg, list) else "rle-" + type(seg["counts"]).__name__)
    assert forms == {"polygon", "rle-str", "rle-list"}  # every form the fixture promises is read
    for i, record in enumerate(data.records):
        masks = instance_masks(record)
        assert masks.shape == (len(record.boxes), record.height, record.width)
        truth = samples[i][1] + ([(0, 0, 6, 6)] if i == 0 else [])  # image 0 also has its crowd region
        for mask, box, expected in zip(masks, record.boxes, truth, strict=True):
            assert _mask_box(mask) == tuple(int(v) for v in box) == expected
            assert mask.sum() == (expected[2] - expected[0]) * (expected[3] - expected[1])  # a filled rectangle
    assert data.records[0].iscrowd[-1] and not any(data.records[0].iscrowd[:-1])


def test_without_masks_the_same_file_reads_as_boxes_only(instance_sets):
    data = read_boxes(str(instance_sets["coco-train"]))
    assert not data.has_masks and all(r.segments is None for r in data.records)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("preset", PRESETS)
def test_masks_stay_on_their_boxes_under_every_augmentation(instance_sets, preset, train):
    data = read_boxes(str(instance_sets["coco-train"]), masks=True)
    dataset = DetectionDataset(data, detection_transforms(preset, 48, train=train, hflip=0.5), 10**8)
    checked = 0
    for seed in range(12):
        torch.manual_seed(seed)
        for i in range(len(data)):
            image, target = dataset[i]
            masks, boxes = target["masks"], target["boxes"]
            assert masks.shape == (len(boxes), *image.shape[-2:])  # dropped boxes take their masks with them
            assert masks.dtype == torch.uint8 and set(masks.unique().tolist()) <= {0, 1}  # nearest, never blended
            assert len(target["labels"]) == len(boxes) == len(target["iscrowd"])
            for mask, box in zip(masks, boxes.tolist(), strict=True):
                if mask.sum() == 0:  # a sliver a crop left under one pixel after the resize
                    continue
                shown = _mask_box(mask)
                if preset == "none" or not train:  # a resize only: within a pixel
                    assert all(abs(a - b) <= 1.5 for a, b in zip(shown, box, strict=True)), (seed, shown, box)
                else:  # a small crop blown up magnifies the pixel a mask edge was rounded to (not a shift)
                    near = max(abs(a - b) for a, b in zip(shown, box, strict=True)) <= 2.5  # small objects
                    assert near or _iou(shown, box) >= 0.7, (preset, seed, shown, box)
                checked += 1
    assert checked > 50


def test_masks_turn_with_an_exif_rotated_image(tmp_path):
    """A file that states the stored size of an image shown turned (EXIF 6): boxes and masks turn with the pixels."""
    stored = np.zeros((30, 50, 3), dtype=np.uint8)  # stored 50 x 30, shown 30 x 50
    stored[5:12, 10:30] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    coco = {
        "images": [{"id": 1, "file_name": "turned.jpg", "width": 50, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 7], "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 12, 10, 12]]},
        ],
        "categories": [{"id": 1, "name": "bar"}],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    record = read_boxes(str(tmp_path / "ann.json"), masks=True).records[0]
    assert (record.width, record.height) == (30, 50)
    (mask,) = instance_masks(record)
    assert _mask_box(mask) == tuple(int(v) for v in record.boxes[0])
    shown = np.asarray(Image.open(tmp_path / "turned.jpg").convert("L").transpose(Image.Transpose.ROTATE_270))
    assert shown[mask.astype(bool)].mean() > 200 and shown[~mask.astype(bool)].mean() < 30  # on the bright bar


def _edited(instance_sets: dict, tmp_path: Path, edit) -> Path:
    coco = json.loads(instance_sets["coco-train"].read_text())
    edit(coco["annotations"])
    path = instance_sets["coco-train"].with_name(f"edited-{tmp_path.name}.json")
    path.write_text(json.dumps(coco))
    return path


def _first_with(anns: list, kind: type) -> dict:
    return next(a for a in anns if isinstance(a["segmentation"], kind) and not a["iscrowd"])


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda anns: _first_with(anns, list).update(segmentation=[[0, 0, 500, 0, 500, 9, 0, 9]]), "outside the"),
        (lambda anns: _first_with(anns, dict).update(segmentation={"size": [48, 64], "counts": "!!garbage"}), "RLE"),
        (lambda anns: _first_with(anns, dict).update(segmentation={"size": [48, 64], "counts": [5, 9]}), "RLE"),
        (lambda anns: _first_with(anns, dict).update(segmentation={"size": [10, 10], "counts": [100]}), "10x10"),
        (lambda anns: _first_with(anns, list).update(segmentation=[[1, 2, 3, 4]]), "at least 3 points"),
        (lambda anns: _first_with(anns, list).pop("segmentation"), "no `segmentation`"),
    ],
    ids=["polygon-outside", "rle-garbage", "rle-short-counts", "rle-wrong-size", "polygon-two-points", "missing"],
)
def test_a_bad_shape_is_one_sentence_naming_the_file_and_annotation(instance_sets, tmp_path, edit, says):
    path = _edited(instance_sets, tmp_path, edit)
    with pytest.raises(DataError) as err:
        read_boxes(str(path), masks=True)
    message = str(err.value)
    assert str(path) in message and "annotation" in message and says in message
    assert "\n" not in message and "Traceback" not in message
    skipped = read_boxes(str(path), masks=True, on_bad_sample="skip")  # or its image is left out and counted
    assert len(skipped) == 7 and len(skipped.skipped) == 1


def test_box_only_data_is_refused_for_a_mask_detector(tmp_path):
    boxes = write_detection_sets(tmp_path / "boxes")
    for path in (boxes["yolo"], boxes["voc"], boxes["coco-train"]):
        with pytest.raises(DataError, match="maskrcnn") as err:
            read_boxes(str(path), masks=True)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_rle_round_trip():
    masks = torch.zeros(3, 9, 7, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True
    masks[2, 5:, :] = True
    rles = encode(masks)
    assert all(isinstance(r["counts"], str) for r in rles)  # JSON-ready
    assert np.array_equal(decoded(rles, 9, 7), masks.numpy())
    assert encode(torch.zeros(0, 9, 7)) == [] and decoded([], 9, 7).shape == (0, 9, 7)


def _same_masks(data, reference) -> None:
    assert len(data) == len(reference) and data.has_masks
    for record, ref in zip(data.records, reference.records, strict=True):
        keep = [k for k, crowd in enumerate(ref.iscrowd) if not crowd]  # YOLO has no crowd regions
        assert np.allclose(record.boxes, [ref.boxes[k] for k in keep], atol=1e-3)  # YOLO writes 6 decimals
        assert np.array_equal(instance_masks(record), instance_masks(ref)[keep])


def test_yolo_polygon_labels_give_the_same_masks(instance_sets):
    _same_masks(
        read_boxes(str(instance_sets["yolo"]), "train", masks=True),
        read_boxes(str(instance_sets["coco-train"]), masks=True),
    )


def test_yolo_box_lines_are_refused_for_masks(instance_sets):
    plain = write_detection_sets(instance_sets["yolo"].parent.parent / "plain")["yolo"]
    with pytest.raises(DataError, match="is a box line") as err:
        read_boxes(str(plain), "train", masks=True)
    assert "labels" in str(err.value) and "\n" not in str(err.value)


def test_datasets_objects_segmentation_gives_the_same_masks(instance_sets, tmp_path):
    datasets = pytest.importorskip("datasets")
    coco = read_boxes(str(instance_sets["coco-train"]), masks=True)
    polygon = lambda box: [[box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]]  # noqa: E731
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=["blue", "green", "red"]),
                    "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                }
            ),
        }
    )
    objects = []
    for r in coco.records:
        kept = [k for k, crowd in enumerate(r.iscrowd) if not crowd]  # crowd regions are COCO's own
        boxes = [r.boxes[k] for k in kept]
        objects.append(
            {
                "bbox": [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes],
                "category": [r.labels[k] for k in kept],
                "segmentation": [polygon(b) for b in boxes],
            }
        )
    rows = {"image": [Image.open(r.image) for r in coco.records], "objects": objects}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "hf")
    _same_masks(read_boxes(str(tmp_path / "hf"), masks=True), coco)
    image, target = DetectionDataset(read_boxes(str(tmp_path / "hf"), masks=True), None, 10**8)[0]
    assert target["masks"].shape == (len(target["boxes"]), *image.shape[-2:])
