"""The same image in train and validation is found before training (issue 15): "the same" is byte-identical content
(core/identity.py). A split keeps every copy of an image on one side, an explicit data.val that shares images with
data.train is refused, and duplicates within a split are counted for data_report.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.classify.config import ClassifyConfig
from visiontune.classify.task import load_split, split_findings
from visiontune.core.dataset import identify, stratified_split
from visiontune.core.errors import DataError
from visiontune.core.identity import image_keys
from visiontune.core.readers import read_dataset


@pytest.fixture(autouse=True)
def _reports_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


def _folder(root: Path, classes: int = 3, per_class: int = 12, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    for c in range(classes):
        for i in range(per_class):
            path = root / f"c{c}" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
            files.append(path)
    return files


def _csv(path: Path, files: list[Path], times: int = 1) -> Path:
    rows = [f"{f},{f.parent.name}" for f in files for _ in range(times)]
    path.write_text("path,label\n" + "\n".join(rows) + "\n")
    return path


def _cfg(tmp_path: Path, **data) -> ClassifyConfig:
    data.setdefault("workers", 0)
    return ClassifyConfig(task="classify", model="timm:resnet18", output_dir=str(tmp_path / "run"), data=data)


def test_csv_listing_every_image_twice_never_straddles_the_split(tmp_path):
    """The issue's case: each image listed twice put 8 of 13 validation images in train."""
    files = _folder(tmp_path / "imgs")
    data = load_split(_cfg(tmp_path, train=str(_csv(tmp_path / "twice.csv", files, 2)), val_split=0.25))
    train, val = {str(p) for p in data.train.items}, {str(p) for p in data.val.items}
    assert not train & val
    assert len(data.train) + len(data.val) == 72 and len(val) == 9  # 9 of 36 images, both records of each
    assert split_findings(data)["duplicates"] == {"train": 27, "val": 9}


def test_val_that_is_a_subset_of_train_is_refused(tmp_path):
    files = _folder(tmp_path / "imgs")
    cfg = _cfg(tmp_path, train=str(tmp_path / "imgs"), val=str(_csv(tmp_path / "val.csv", files[:5])))
    with pytest.raises(DataError, match=r"^5 of 5 validation records have an image that is also in the training"):
        load_split(cfg)


def test_a_renamed_copy_in_val_is_the_same_image(tmp_path):
    files = _folder(tmp_path / "train")
    _folder(tmp_path / "val", seed=1)
    copy = tmp_path / "val" / "c1" / "copy_of_c0_03.png"
    shutil.copy(files[3], copy)
    with pytest.raises(DataError, match=rf"1 of 37 validation records .*: {copy} = {files[3]}; remove them"):
        load_split(_cfg(tmp_path, train=str(tmp_path / "train"), val=str(tmp_path / "val")))


def test_distinct_splits_pass_and_report_no_duplicates(tmp_path):
    _folder(tmp_path / "train")
    _folder(tmp_path / "val", seed=1)
    data = load_split(_cfg(tmp_path, train=str(tmp_path / "train"), val=str(tmp_path / "val")))
    findings = split_findings(data)
    assert findings["duplicates"] == {"train": 0, "val": 0} and findings["left_out"] == []
    assert findings["data"]["classes"] == ["c0", "c1", "c2"] and findings["data"]["train"] == 36


def test_split_without_duplicates_is_unchanged(tmp_path):
    """Grouping by image must not move a single record when every image is distinct (same seeds, same splits)."""
    from sklearn.model_selection import train_test_split

    _folder(tmp_path / "imgs")
    data = read_dataset(str(tmp_path / "imgs"))
    train, val = stratified_split(data, 0.25, seed=7)
    old_train, old_val = train_test_split(np.arange(36), test_size=9, random_state=7, stratify=np.asarray(data.labels))
    assert [str(p) for p in val.items] == [str(data.items[i]) for i in sorted(old_val.tolist())]
    assert len(train) == len(old_train)


def test_image_keys_compare_content_not_names(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"1234")
    b.write_bytes(b"5678")  # same size, other content: hashed, different
    shutil.copy(a, tmp_path / "a_copy.bin")
    (tmp_path / "unique.bin").write_bytes(b"123456789")  # a size no other file has: keyed by its path, not read
    keys = image_keys([a, b, tmp_path / "a_copy.bin", str(a), tmp_path / "unique.bin", None, None])
    assert keys[0] == keys[2] == keys[3] and keys[0] != keys[1]
    assert keys[4] == f"file:{(tmp_path / 'unique.bin').resolve()}" and keys[5] != keys[6]
    arrays = image_keys([np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), np.zeros((4,), np.uint8)])
    assert arrays[0] == arrays[1] != arrays[2]  # same bytes, other shape: another image


def test_identify_keeps_keys_through_subsets(tmp_path):
    data = read_dataset(str(_csv(tmp_path / "twice.csv", _folder(tmp_path / "imgs"), 2)))
    (keys,) = identify(data)
    assert keys[0] == keys[1] and data.subset([1, 0]).keys == [keys[1], keys[0]]


# ---------------------------------------------------------------------------------------------- caption pairs


def _captions(path: Path, files: list[Path]) -> Path:
    path.write_text("image,caption\n" + "".join(f"{f},a photo of {f.parent.name}\n" for f in files))
    return path


def test_caption_split_keeps_renamed_copies_of_an_image_together(tmp_path):
    from visiontune.clip.captions import pair_duplicates, read_captions, split_by_image

    files = _folder(tmp_path / "imgs", per_class=4)
    copies = [tmp_path / "imgs" / "c0" / f"copy{i}.png" for i in range(3)]
    for copy in copies:
        shutil.copy(files[0], copy)
    pairs = read_captions(str(_captions(tmp_path / "pairs.csv", files + copies + files[:1])))
    train, val = split_by_image(pairs, 0.5, seed=0)
    sides = [{str(s) for s in part.sources} & {str(files[0]), *map(str, copies)} for part in (train, val)]
    assert [bool(side) for side in sides].count(True) == 1  # all four names of one image on one side
    assert pair_duplicates(pairs) == 4  # the same image content with the same caption: 3 copies + 1 repeated row


def test_caption_val_sharing_an_image_with_train_is_refused(tmp_path):
    from visiontune.clip.captions import read_captions, refuse_pair_leak

    files = _folder(tmp_path / "imgs", per_class=4)
    train = read_captions(str(_captions(tmp_path / "train.csv", files[4:])))
    val = read_captions(str(_captions(tmp_path / "val.csv", files[:5])))
    with pytest.raises(DataError, match=r"^1 of 5 validation records have an image that is also in the training"):
        refuse_pair_leak(train, val)
