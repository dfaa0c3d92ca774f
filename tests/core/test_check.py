"""`clean` / `find_bad_samples`: bad files are found before training, named in the error with the fix, or
skipped with `data.on_bad_sample=skip`. All images are generated here."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.core.check import clean, clean_splits, find_bad_samples
from visiontune.core.errors import DataError
from visiontune.core.readers import LabeledImages, read_dataset

CAP = 10_000_000


@pytest.fixture(autouse=True)
def _reports_in_tmp(tmp_path, monkeypatch):
    """Error-mode checks write a report file under $VISIONTUNE_CACHE/reports; keep it out of the real cache."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


def _png(path: Path, colour=(255, 0, 0), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _noise(path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path


def _cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return path


def _zero_bytes(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _folder(tmp_path: Path) -> Path:
    """Image folder with two good images per class (cat, dog)."""
    root = tmp_path / "images"
    for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i in range(2):
            _png(root / name / f"good{i}.png", colour)
    return root


BAD_FILES = {
    "corrupt": (lambda root: _corrupt(root / "cat" / "noise.png"), "cannot identify image file"),
    "truncated_png": (lambda root: _cut_in_half(_noise(root / "cat" / "half.png")), "truncated"),
    "truncated_jpeg": (lambda root: _cut_in_half(_noise(root / "dog" / "half.jpg")), "truncated"),
    "zero_bytes": (lambda root: _zero_bytes(root / "dog" / "empty.png"), "cannot identify image file"),
    "bomb": (lambda root: _png(root / "dog" / "huge.png", size=(200, 100)), "over the data.max_image_pixels cap"),
}
BOMB_CAP = 10_000  # good images are 8x8, truncated ones 64x64 = 4,096 pixels; the "bomb" is 200x100 = 20,000


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_stops_with_a_message_naming_it_and_the_fix(tmp_path, kind):
    root = _folder(tmp_path)
    make, reason = BAD_FILES[kind]
    bad_path = make(root)
    data = read_dataset(str(root))
    assert len(data) == 5
    with pytest.raises(DataError) as info:
        clean(data, "error", BOMB_CAP, "train")
    message = str(info.value)
    assert str(bad_path) in message
    assert reason in message.lower()
    assert "1 bad train sample(s)" in message
    assert "data.on_bad_sample=skip" in message
    assert "good0.png" not in message


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_skip_drops_the_bad_file_and_keeps_the_good(tmp_path, kind):
    root = _folder(tmp_path)
    make, reason = BAD_FILES[kind]
    bad_path = make(root)
    data = read_dataset(str(root))
    bad_index = data.items.index(bad_path)
    kept, bad = clean(data, "skip", BOMB_CAP, "train")
    assert len(bad) == 1
    assert bad[0].index == bad_index and bad[0].ref == str(bad_path) and reason in bad[0].reason.lower()
    assert len(kept) == 4 and bad_path not in kept.items
    assert kept.class_names == ["cat", "dog"]
    for item, label in zip(kept.items, kept.labels, strict=True):  # labels still line up with the files
        assert Path(item).parent.name == kept.class_names[label]


def test_missing_file_from_csv(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimgs/a.png,cat\nimgs/gone.png,dog\n")
    data = read_dataset(str(csv))
    with pytest.raises(DataError) as info:
        clean(data, "error", CAP, "val")
    message = str(info.value)
    assert str(tmp_path / "imgs" / "gone.png") in message and "file not found" in message
    assert "1 bad val sample(s)" in message and "data.on_bad_sample=skip" in message
    kept, bad = clean(data, "skip", CAP, "val")
    assert [Path(p).name for p in kept.items] == ["a.png"] and kept.labels == [0]
    assert bad[0].ref == str(tmp_path / "imgs" / "gone.png") and bad[0].reason == "file not found"


def test_skip_returns_every_bad_sample_with_reasons(tmp_path):
    root = _folder(tmp_path)
    made = {kind: make(root) for kind, (make, _) in BAD_FILES.items()}
    data = read_dataset(str(root))
    kept, bad = clean(data, "skip", BOMB_CAP, "train")
    assert sorted(Path(p).name for p in kept.items) == ["good0.png", "good0.png", "good1.png", "good1.png"]
    by_ref = {b.ref: b for b in bad}
    assert set(by_ref) == {str(p) for p in made.values()}
    for kind, path in made.items():
        assert BAD_FILES[kind][1] in by_ref[str(path)].reason.lower()
        assert data.items[by_ref[str(path)].index] == path
    assert [b.index for b in bad] == sorted(b.index for b in bad)


def test_error_lists_at_most_ten_and_counts_the_rest(tmp_path):
    root = _folder(tmp_path)
    for i in range(12):
        _corrupt(root / "cat" / f"bad{i:02d}.png")
    with pytest.raises(DataError) as info:
        clean(read_dataset(str(root)), "error", CAP, "train")
    message = str(info.value)
    assert message.startswith("12 bad train sample(s)") and "; ... and 2 more (the full list is in " in message
    assert message.count("cannot identify image file") == 10


def test_everything_bad_is_an_error_even_with_skip(tmp_path):
    root = tmp_path / "images"
    _corrupt(root / "cat" / "a.png")
    _zero_bytes(root / "dog" / "b.png")
    with pytest.raises(DataError, match=r"Every train sample in .*images is bad \(first: .*a\.png .*cannot identify"):
        clean(read_dataset(str(root)), "skip", CAP, "train")


def test_empty_dataset_is_an_error_naming_it():
    empty = LabeledImages([], [], ["a"], "/data/empty.csv")
    with pytest.raises(DataError, match=r"The val dataset /data/empty\.csv is empty; point data\.val at images"):
        clean(empty, "skip", CAP, "val")


def test_clean_dataset_is_returned_unchanged(tmp_path):
    data = read_dataset(str(_folder(tmp_path)))
    kept, bad = clean(data, "error", CAP, "train")
    assert kept is data and bad == []


def test_in_memory_arrays_are_never_bad():
    data = LabeledImages(np.zeros((3, 8, 8), np.uint8), [0, 1, 0], ["a", "b"], "builtin:x", "array")
    assert find_bad_samples(data, 1) == []
    kept, bad = clean(data, "error", 1, "train")
    assert kept is data and bad == []


# ---------------------------------------------------------------- `datasets` records


def _png_bytes(colour, size=(6, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _hf_saved(tmp_path: Path, images: list, labels: list[int]) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    records = [None if b is None else {"bytes": b, "path": None} for b in images]
    path = tmp_path / "hf"
    datasets.Dataset.from_dict({"image": records, "label": labels}, features=features).save_to_disk(str(path))
    return path


def test_hf_records_with_bad_images_are_found_not_crashed_on(tmp_path):
    good = _png_bytes((255, 0, 0))
    half = _png_bytes((0, 255, 0), size=(64, 64))
    path = _hf_saved(
        tmp_path,
        [good, b"not an image", good, _png_bytes((0, 0, 255), size=(200, 100)), None, half[: len(half) // 2]],
        [0, 1, 1, 0, 1, 0],
    )
    data = read_dataset(str(path))
    with pytest.raises(DataError) as info:
        clean(data, "error", BOMB_CAP, "train")
    message = str(info.value)
    assert message.startswith("4 bad train sample(s)") and f"{path} record 1 cannot be decoded" in message
    assert "data.on_bad_sample=skip" in message
    kept, bad = clean(data, "skip", BOMB_CAP, "train")
    assert kept.items == [0, 2] and kept.labels == [0, 1]
    reasons = {b.index: b.reason for b in bad}
    assert set(reasons) == {1, 3, 4, 5}
    assert "cannot identify image file" in reasons[1]
    assert "200x100 = 20,000 pixels" in reasons[3]
    assert reasons[4] == "has no image"
    assert "truncated" in reasons[5]


# ---------------------------------------------------------------- train and val checked together


def _two_splits(tmp_path: Path, bad_train: int, bad_val: int) -> dict[str, LabeledImages]:
    train, val = _folder(tmp_path / "train"), _folder(tmp_path / "val")
    for i in range(bad_train):
        _corrupt(train / "cat" / f"bad{i:02d}.png")
    for i in range(bad_val):
        _zero_bytes(val / "dog" / f"empty{i:02d}.png")
    return {"train": read_dataset(str(train)), "val": read_dataset(str(val))}


def test_clean_splits_lists_the_bad_files_of_train_and_val_in_one_error(tmp_path):
    splits = _two_splits(tmp_path, 2, 1)
    with pytest.raises(DataError) as info:
        clean_splits(splits, "error", CAP)
    message = str(info.value)
    assert message.startswith("3 bad sample(s) in the train and val data (2 train, 1 val): ")
    assert f"{tmp_path / 'train' / 'images' / 'cat' / 'bad00.png'} (train) is corrupt" in message
    assert f"{tmp_path / 'val' / 'images' / 'dog' / 'empty00.png'} (val) " in message
    assert "more" not in message and message.endswith("set data.on_bad_sample=skip to train without them.")
    assert "\n" not in message
    kept, bad = clean_splits(splits, "skip", CAP)
    assert {role: len(data) for role, data in kept.items()} == {"train": 4, "val": 4}
    named = [(b.split, Path(b.ref).name) for b in bad]
    assert named == [("train", "bad00.png"), ("train", "bad01.png"), ("val", "empty00.png")]
    assert all(splits[b.split].items[b.index] == Path(b.ref) for b in bad)


def test_clean_splits_names_ten_counts_the_rest_and_writes_them_all_to_a_report(tmp_path):
    splits = _two_splits(tmp_path, 9, 4)
    with pytest.raises(DataError) as info:
        clean_splits(splits, "error", CAP)
    message = str(info.value)
    assert message.startswith("13 bad sample(s) in the train and val data (9 train, 4 val)")
    assert message.count("(train) is corrupt") == 9 and message.count("(val) is corrupt") == 1
    match = re.search(r"; \.\.\. and 3 more \(the full list is in (\S+\.txt)\); fix or remove them", message)
    assert match, message
    report = Path(match.group(1))
    assert report.parent == tmp_path / "cache" / "reports"
    lines = report.read_text().splitlines()
    last = f"{tmp_path / 'val' / 'images' / 'dog' / 'empty03.png'} (val) is corrupt or not an image ("
    assert len(lines) == 13 and sum(line.startswith(last) for line in lines) == 1
    assert all(line.split(" (")[0] in {str(p) for d in splits.values() for p in d.items} for line in lines)


def test_report_goes_to_the_home_cache_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("VISIONTUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError, match=r"full list is in .*/home/\.cache/visiontune/reports/bad-samples-\S+\.txt\)"):
        clean(_two_splits(tmp_path, 1, 0)["train"], "error", CAP, "train")


def test_clean_splits_skip_still_refuses_a_split_with_nothing_left(tmp_path):
    splits = _two_splits(tmp_path, 0, 0)
    val = tmp_path / "allbad"
    _corrupt(val / "cat" / "a.png")
    splits["val"] = read_dataset(str(val))
    with pytest.raises(DataError, match=r"^Every val sample in .*allbad is bad \(first: .*a\.png"):
        clean_splits(splits, "skip", CAP)
    splits["val"] = LabeledImages([], [], ["cat"], "/data/empty.csv")
    with pytest.raises(DataError, match=r"^The val dataset /data/empty\.csv is empty"):
        clean_splits(splits, "error", CAP)
