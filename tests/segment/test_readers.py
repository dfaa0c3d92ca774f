"""Segmentation readers: one generated set read the same from label-id and palette mask folders, VOC, COCO
(polygons, RLE, crowd) and a `datasets` folder; class names and ignore; reduce_labels; every bad input named (or
skipped and counted) before training; EXIF-turned masks; split; Dataset and collate."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from visiontune.core.check import check_splits
from visiontune.core.errors import DataError
from visiontune.segment.check import MASKS, find_bad_images
from visiontune.segment.data import MaskDataset, decode_mask, read_masks, split_masks
from visiontune.segment.dataset import SegmentationDataset, segmentation_collate
from visiontune.testing.segment_fixtures import (
    CLASSES,
    IGNORE,
    PALETTE,
    PALETTE_IGNORE,
    segmentation_samples,
    write_segmentation_sets,
)

FULL_PALETTE = {**PALETTE, "ignore": PALETTE_IGNORE}
SPLITS = {"train": range(0, 8), "val": range(8, 12)}


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    return write_segmentation_sets(tmp_path_factory.mktemp("segment-sets"))


@pytest.fixture
def copy(sets, tmp_path):
    """A private copy of the generated sets, for tests that damage them."""
    root = sets["ids"].parent
    shutil.copytree(root, tmp_path / "sets")
    return {key: tmp_path / "sets" / path.relative_to(root) for key, path in sets.items()}


def _read(sets: dict[str, Path], form: str, split: str = "train", **kw) -> MaskDataset:
    if form == "coco":
        return read_masks(str(sets[f"coco-{split}"]), **kw)
    if form == "palette":
        kw.setdefault("palette", FULL_PALETTE)
    return read_masks(str(sets[form]), split=split, **kw)


FORMS = ["ids", "palette", "voc", "coco", "hf"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_same_masks_from_every_format(sets, split):
    samples = segmentation_samples()
    for form in FORMS:
        data = _read(sets, form, split, class_names=CLASSES if form == "hf" else None)
        assert data.class_names == CLASSES, form
        assert len(data) == len(SPLITS[split]) and not data.skipped, form
        for record, i in zip(data.records, SPLITS[split], strict=True):
            mask = decode_mask(data, record)
            assert mask.dtype == np.int64 and (record.height, record.width) == mask.shape, form
            np.testing.assert_array_equal(mask, samples[i][1], err_msg=f"{form} {record.image}")
        expected = np.bincount(np.concatenate([samples[i][1].ravel() for i in SPLITS[split]]), minlength=256)
        assert data.pixel_counts == expected[: len(CLASSES)].tolist(), form  # ignore pixels never counted


def test_class_names_inferred_or_given_in_another_order(sets):
    inferred = _read(sets, "hf")  # no names anywhere: the ids found
    assert inferred.class_names == ["0", "1", "2", "3"]
    order = ["red", "background", "green", "blue"]
    for form in ("ids", "voc", "coco"):  # names from classes.txt / categories, mapped onto the given order
        data = _read(sets, form, class_names=order)
        assert data.class_names == order
        record = data.records[0]
        remapped = np.array([order.index(n) for n in CLASSES] + [IGNORE])[
            np.where(segmentation_samples()[0][1] == IGNORE, 4, segmentation_samples()[0][1])
        ]
        np.testing.assert_array_equal(decode_mask(data, record), remapped, err_msg=form)


def test_coco_without_background_leaves_uncovered_pixels_ignored(sets):
    data = _read(sets, "coco", class_names=["blue", "green", "red"])
    mask, truth = decode_mask(data, data.records[0]), segmentation_samples()[0][1].astype(np.int64)
    np.testing.assert_array_equal(mask, np.where((truth == 0) | (truth == IGNORE), IGNORE, truth - 1))


def test_reduce_labels_reads_zero_as_ignore(sets):
    """ADE20K / scene_parse_150: id 0 is "other", read as ignore; id k is class k - 1 (transformers' reduce_labels)."""
    data = _read(sets, "hf", class_names=CLASSES[1:], reduce_labels=True)
    truth = segmentation_samples()[0][1].astype(np.int64)
    np.testing.assert_array_equal(
        decode_mask(data, data.records[0]), np.where((truth == 0) | (truth == IGNORE), IGNORE, truth - 1)
    )


def test_palette_and_ignore_settings_refused_in_one_sentence(sets):
    with pytest.raises(DataError, match=r"data.palette.red is \[1, 2\]"):
        _read(sets, "palette", palette={**PALETTE, "red": [1, 2]})
    with pytest.raises(DataError, match="two entries"):
        _read(sets, "palette", palette={**PALETTE, "red": PALETTE["blue"]})
    with pytest.raises(DataError, match="'green', which is not among data.class_names"):
        _read(sets, "palette", class_names=["background", "blue", "red"])
    with pytest.raises(DataError, match="ignore_index 0 is also the id of class 'background'.*reduce_labels"):
        _read(sets, "ids", ignore_index=0)


# ---------------------------------------------------------------------------------------------- bad inputs


def _damage_ids(root: Path) -> dict[str, str]:
    """Five broken train samples of the ids folder: {file named in the error: what is wrong}."""
    masks = root / "masks" / "train"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "img_000.png")  # wrong size
    bad_id = np.array(Image.open(masks / "img_001.png"))
    bad_id[0, 0] = 7
    Image.fromarray(bad_id).save(masks / "img_001.png")  # a label id with no class
    (masks / "img_002.png").unlink()  # a missing mask
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "stray.png")  # a mask with no image
    rgb = np.zeros((60, 80, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(masks / "img_006.png")  # colours read as ids
    return {
        "img_000.png": "is 10x10 but its image is 64x48",
        "img_001.png": "has label id(s) 7 with no class (ids with a class: 0-3; ignore: 255)",
        "img_002.png": "is missing",
        "stray.png": "has no image",
        "img_006.png": "is a colour (RGB) mask",
    }


def test_every_bad_mask_named_in_one_sentence_or_skipped(copy):
    broken = _damage_ids(copy["ids"])
    with pytest.raises(DataError) as err:
        _read(copy, "ids")
    message = str(err.value)
    assert message.startswith("5 bad annotation(s) in ") and "data.on_bad_sample=skip" in message
    for file, reason in broken.items():
        assert f"{file} {reason}" in message
    data = _read(copy, "ids", on_bad_sample="skip")
    assert len(data) == 4 and len(data.skipped) == 5  # the stray mask is counted; it drops no image
    assert {Path(r.image).name for r in data.records} == {"img_003.png", "img_004.png", "img_005.png", "img_007.png"}


def test_palette_colour_not_in_palette(copy):
    mask = copy["palette"] / "train" / "masks" / "img_004.png"
    rgb = np.array(Image.open(mask))
    rgb[3, 3] = (9, 9, 9)
    Image.fromarray(rgb).save(mask)
    with pytest.raises(DataError, match=r"img_004.png has the colour\(s\) \(9, 9, 9\), not in data.palette"):
        _read(copy, "palette")
    palette = dict(PALETTE)  # without the ignore entry, VOC's border colour is a colour outside the palette too
    with pytest.raises(DataError, match=r"img_002.png has the colour\(s\) \(224, 224, 192\)"):
        _read(copy, "palette", palette=palette, on_bad_sample="error")
    assert len(_read(copy, "palette", on_bad_sample="skip")) == 7


def test_voc_and_hf_bad_masks(copy):
    voc = copy["voc"] / "SegmentationClass"
    (voc / "img_003.png").unlink()
    Image.fromarray(np.full((48, 64), 9, np.uint8)).save(voc / "img_004.png")
    with pytest.raises(DataError, match="img_003.png is missing.*img_004.png has label id.s. 9 with no class"):
        _read(copy, "voc", class_names=CLASSES)
    with pytest.raises(DataError, match="row 2 annotation has label id.s. 3 with no class"):
        _read(copy, "hf", class_names=CLASSES[:3])


def test_coco_bad_shapes(copy):
    path = copy["coco-train"]
    coco = json.loads(path.read_text())
    coco["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]  # a box, not a polygon
    coco["annotations"][1]["category_id"] = 99
    rles = [a for a in coco["annotations"][2:] if isinstance(a["segmentation"], dict)]
    rles[0]["segmentation"]["size"] = [5, 5]
    rles[1]["segmentation"]["counts"] = "garbage"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError) as err:
        read_masks(str(path))
    message = str(err.value)
    assert "annotation 1 (image img_000.png) has a polygon that is not" in message
    assert "annotation 2 (image img_000.png) has category 99" in message
    assert "has an RLE of 5x5 on a" in message and "has an RLE pycocotools cannot decode" in message
    assert len(read_masks(str(path), on_bad_sample="skip").skipped) == 4


def test_unknown_paths_and_a_jpeg_mask(copy, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_masks(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="not a segmentation set visiontune reads"):
        read_masks(str(tmp_path))
    with pytest.raises(DataError, match="built-in datasets"):
        read_masks("builtin:cifar-segment")
    masks = copy["ids"] / "masks" / "val"
    Image.open(masks / "img_008.png").save(masks / "img_008.jpg")
    (masks / "img_008.png").unlink()
    with pytest.raises(DataError, match="img_008.jpg is a JPEG"):
        _read(copy, "ids", "val")


# ---------------------------------------------------------------------------------------------- EXIF


def _turned_photo(orientation: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(a PNG whose stored 40x30 pixels have a class-2 patch, tagged with `orientation`; the mask on the stored
    pixels; the mask as the photo is displayed)."""
    stored = np.zeros((30, 40), np.uint8)
    stored[3:9, 5:17] = 2
    pixels = np.stack([stored * 100] * 3, axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif.tobytes())
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))[..., 0] // 100
    return buffer.getvalue(), stored, shown


@pytest.mark.parametrize("orientation", [6, 8, 5])
@pytest.mark.parametrize("drawn_on", ["displayed", "stored"])
def test_exif_turned_photo_masks_follow_the_pixels(tmp_path, orientation, drawn_on):
    photo, stored, shown = _turned_photo(orientation)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    (tmp_path / "images" / "a.png").write_bytes(photo)
    Image.fromarray(shown if drawn_on == "displayed" else stored).save(tmp_path / "masks" / "a.png")
    data = read_masks(str(tmp_path), class_names=["background", "x", "patch"])
    record = data.records[0]
    assert record.orientation == (1 if drawn_on == "displayed" else orientation)
    np.testing.assert_array_equal(decode_mask(data, record), shown)
    image, mask = SegmentationDataset(data, None, 10**6)[0]
    assert torch.equal((image[0] > 0.5).long() * 2, mask.as_subclass(torch.Tensor))  # patch pixels = patch class


# ---------------------------------------------------------------------------------------------- split, Dataset


def test_split_masks_is_seeded_and_disjoint(sets):
    data = _read(sets, "ids")
    train, val = split_masks(data, 0.25, seed=3)
    again = split_masks(data, 0.25, seed=3)
    assert (len(train), len(val)) == (6, 2) and train.records == again[0].records
    assert not {r.image for r in train.records} & {r.image for r in val.records}
    assert val.lut is data.lut and val.class_names == data.class_names  # decodable on its own


def test_dataset_items_collate_and_decode_check(sets):
    from visiontune.segment.transforms import segmentation_transforms

    data = _read(sets, "coco")
    dataset = SegmentationDataset(data, segmentation_transforms("none", 32, train=False), 10**6)
    batch = segmentation_collate([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (3, 32, 32) and batch["labels"].dtype == torch.int64
    assert 0 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1
    kept, bad = check_splits({"train": data}, lambda d: find_bad_images(d, 10**6), "error", MASKS)
    assert kept["train"] is data and not bad


def test_ade20k_folder_layout(copy):
    """ADEChallengeData2016: images/training + annotations/training, read as split train."""
    root = copy["ids"]
    for split, ade in (("train", "training"), ("val", "validation")):
        (root / "images" / split).rename(root / "images" / ade)
    (root / "masks").rename(root / "annotations")
    for split in ("train", "val"):
        (root / "annotations" / split).rename(root / "annotations" / {"train": "training", "val": "validation"}[split])
    data = read_masks(str(root), "val")
    assert [Path(r.mask).parent.name for r in data.records] == ["validation"] * 4
    np.testing.assert_array_equal(decode_mask(data, data.records[0]), segmentation_samples()[8][1])
