"""Readers (image folder, CSV, JSONL, saved `datasets`, built-ins) and the seeded stratified split.
All images are generated here."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.core.dataset import ImageClassificationDataset, stratified_split
from visiontune.core.errors import DataError
from visiontune.core.readers import LabeledImages, read_dataset
from visiontune.core.transforms import Preprocess, eval_transform


def _png(path: Path, colour=(255, 0, 0), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _error(match: str | None = None, **kwargs) -> pytest.RaisesContext:
    return pytest.raises(DataError, match=match, **kwargs)


# ---------------------------------------------------------------- image folder


def test_image_folder_classes_sorted_and_labels_right(tmp_path):
    root = tmp_path / "imgs"
    counts = {"zebra": 3, "apple": 1, "mango": 2}
    for name, n in counts.items():
        for i in range(n):
            _png(root / name / f"{i}.png")
    _png(root / "mango" / "nested" / "deep.jpg")  # sub-folders of a class belong to it
    (root / "apple" / "notes.txt").write_text("not an image")
    _png(root / ".hidden" / "x.png")  # hidden folders are not classes
    data = read_dataset(str(root))
    assert data.class_names == ["apple", "mango", "zebra"]
    assert data.kind == "file" and data.origin == str(root)
    assert len(data) == 7
    assert Counter(data.labels) == {0: 1, 1: 3, 2: 3}
    for item, label in zip(data.items, data.labels, strict=True):
        assert Path(item).relative_to(root).parts[0] == data.class_names[label]
    assert root / "mango" / "nested" / "deep.jpg" in data.items


def test_image_folder_class_names_fix_order(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "b" / "1.png")
    _png(root / "a" / "1.png")
    data = read_dataset(str(root), class_names=["b", "a", "c"])
    assert data.class_names == ["b", "a", "c"]
    assert {Path(p).parent.name: label for p, label in zip(data.items, data.labels, strict=True)} == {"b": 0, "a": 1}
    with _error(r"Class folder .*imgs/a is not in data.class_names \['b'\]"):
        read_dataset(str(root), class_names=["b"])


def test_empty_class_folder_is_named(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "cat" / "1.png")
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    with _error(rf"Class folder {root / 'dog'} has no images; its 1 .txt file\(s\) are not a format Pillow reads"):
        read_dataset(str(root))


def test_folder_without_class_subfolders(tmp_path):
    root = tmp_path / "flat"
    _png(root / "1.png")
    with _error(rf"{root} has no class sub-folders; put each class's images in {root}/<class name>/"):
        read_dataset(str(root))


def test_duplicated_class_names(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "a" / "1.png")
    with _error(r"class names \['a'\] appear more than once; make data.class_names unique"):
        read_dataset(str(root), class_names=["a", "b", "a"])
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\nimgs/a/1.png,a\n")
    with _error(rf"{csv}: class names \['a'\] appear more than once"):
        read_dataset(str(csv), class_names=["a", "a"])


# ---------------------------------------------------------------- CSV / JSONL


@pytest.fixture
def meta(tmp_path, monkeypatch):
    """Images under tmp/meta/pics, the label file goes in tmp/meta, and the cwd is elsewhere."""
    base = tmp_path / "meta"
    _png(base / "pics" / "r.png", (255, 0, 0))
    _png(base / "pics" / "g.png", (0, 255, 0))
    _png(base / "pics" / "b.png", (0, 0, 255))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return base


def _check_rgb_records(data: LabeledImages, base: Path, names: list[str]) -> None:
    assert data.class_names == names
    assert data.items == [base / "pics" / f for f in ("r.png", "g.png", "b.png")]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in data.items)
    assert [data.class_names[i] for i in data.labels] == ["red", "green", "blue"]


def test_csv_paths_are_relative_to_the_file(meta):
    csv = meta / "labels.csv"
    csv.write_text("path,label\npics/r.png,red\npics/g.png,green\npics/b.png,blue\n")
    data = read_dataset(str(csv))
    _check_rgb_records(data, meta, ["blue", "green", "red"])
    assert data.origin == str(csv)
    image = ImageClassificationDataset(data, lambda x: x, 10**6).load(1)  # the files really are found
    assert image.getpixel((0, 0)) == (0, 255, 0)


def test_jsonl_paths_are_relative_to_the_file(meta):
    jsonl = meta / "labels.jsonl"
    rows = [
        {"image": "pics/r.png", "label": "red"},
        {"image": "pics/g.png", "label": "green"},
        {"image": "pics/b.png", "label": "blue"},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    _check_rgb_records(read_dataset(str(jsonl), class_names=["red", "green", "blue"]), meta, ["red", "green", "blue"])


def test_numeric_labels_sort_naturally(meta):
    jsonl = meta / "labels.jsonl"
    jsonl.write_text("".join(json.dumps({"path": "pics/r.png", "label": n}) + "\n" for n in (10, 2, 1, 2)))
    data = read_dataset(str(jsonl))
    assert data.class_names == ["1", "2", "10"] and data.labels == [2, 1, 0, 1]


def test_csv_with_byte_order_mark(meta):
    csv = meta / "excel.csv"
    csv.write_text("path,label\npics/r.png,red\npics/g.png,green\npics/b.png,blue\n", encoding="utf-8-sig")
    assert csv.read_bytes().startswith(b"\xef\xbb\xbf")
    _check_rgb_records(read_dataset(str(csv)), meta, ["blue", "green", "red"])


def test_csv_unknown_label_names_file_and_line(meta):
    csv = meta / "labels.csv"
    csv.write_text("path,label\npics/r.png,red\n\npics/g.png,purple\n")  # blank line 3: the bad row is line 4
    with _error(
        rf"{csv} line 4: label 'purple' is not in data.class_names \['red', 'green'\]; "
        r"fix the label or remove the line or add it to data.class_names"
    ):
        read_dataset(str(csv), class_names=["red", "green"])


def test_jsonl_unknown_label_names_file_and_line(meta):
    jsonl = meta / "labels.jsonl"
    jsonl.write_text('{"path": "pics/r.png", "label": "red"}\n\n{"path": "pics/g.png", "label": "purple"}\n')
    with _error(rf"{jsonl} line 3: label 'purple' is not in data.class_names"):
        read_dataset(str(jsonl), class_names=["red"])


def test_jsonl_bad_line_is_named(meta):
    jsonl = meta / "labels.jsonl"
    jsonl.write_text('{"path": "pics/r.png", "label": "red"}\n{"path": "pics/g.png", "label": \n')
    with _error(rf"{jsonl} line 2 is not valid JSON \(.*\); fix or remove that line"):
        read_dataset(str(jsonl))
    jsonl.write_text('{"path": "pics/r.png", "label": "red"}\n["pics/g.png", "red"]\n')
    with _error(rf"{jsonl} line 2 is not a JSON object"):
        read_dataset(str(jsonl))


def test_record_without_path_or_label_is_named(meta):
    jsonl = meta / "labels.jsonl"
    jsonl.write_text('{"path": "pics/r.png", "label": "red"}\n{"label": "red"}\n')
    with _error(rf"{jsonl} line 2 has no path; fill it in or remove that line"):
        read_dataset(str(jsonl))
    csv = meta / "labels.csv"
    csv.write_text("path,label\npics/r.png,red\npics/g.png,\n")
    with _error(rf"{csv} line 3 has no label"):
        read_dataset(str(csv))


def test_csv_without_the_columns(meta):
    csv = meta / "labels.csv"
    csv.write_text("file_name,class\npics/r.png,red\n")
    with _error(r"needs columns `path` and `label` \(found \['class', 'file_name'\]\); rename the columns"):
        read_dataset(str(csv))
    csv.write_text("path,label\n")
    with _error(rf"{csv} has no records"):
        read_dataset(str(csv))


# ---------------------------------------------------------------- `datasets` saved to disk


def _png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "bird": (0, 0, 255)}


def _save_hf(path: Path, labels: list[int], names=("cat", "dog", "bird"), label_feature=None, dict_split=None):
    import datasets

    label_feature = label_feature or datasets.ClassLabel(names=list(names))
    features = datasets.Features({"img": datasets.Image(), "target": label_feature})
    images = [
        _png_bytes(COLOURS[names[i]]) if isinstance(i, int) and 0 <= i < len(names) else _png_bytes((9, 9, 9))
        for i in labels
    ]
    ds = datasets.Dataset.from_dict({"img": images, "target": labels}, features=features)
    (datasets.DatasetDict({dict_split: ds}) if dict_split else ds).save_to_disk(str(path))
    return path


def test_saved_dataset_class_names_come_from_classlabel(tmp_path):
    path = _save_hf(tmp_path / "hf", [2, 0, 1, 2])
    data = read_dataset(str(path), image_column="img", label_column="target")
    assert data.kind == "hf" and data.class_names == ["cat", "dog", "bird"]  # ClassLabel order, not sorted
    assert data.labels == [2, 0, 1, 2] and data.items == [0, 1, 2, 3]
    assert data.ref(1) == f"{path} record 1"
    ds = ImageClassificationDataset(data, eval_transform(Preprocess(8, (0.5,) * 3, (0.5,) * 3)), 10**6)
    for i, label in enumerate(data.labels):  # images decode and line up with their labels
        expected = torch.tensor(COLOURS[data.class_names[label]], dtype=torch.float32) / 127.5 - 1
        torch.testing.assert_close(ds[i]["pixel_values"][:, 3, 3], expected)
        assert ds[i]["labels"] == label


def test_saved_dataset_dict_and_default_columns(tmp_path):
    import datasets

    path = _save_hf(tmp_path / "hf", [1, 1, 0], dict_split="validation")
    # 'img' is a default image column, 'target' is not a default label column:
    with _error(
        rf"Dataset {path}: none of \['label', 'labels', 'fine_label'\] is among "
        r"\['img', 'target'\]; set data.label_column"
    ):
        read_dataset(str(path))
    data = read_dataset(str(path), label_column="target", split="train")  # missing split: the first one
    assert data.labels == [1, 1, 0] and data.image_column == "img"
    strings = _save_hf(tmp_path / "hf2", ["dog", "cat", "dog"], label_feature=datasets.Value("string"))
    data = read_dataset(str(strings), label_column="target")
    assert data.class_names == ["cat", "dog"] and data.labels == [1, 0, 1]


def test_saved_dataset_missing_column_lists_columns(tmp_path):
    path = _save_hf(tmp_path / "hf", [0, 1])
    with _error(r"has no column 'image' \(data.image_column\); columns are \['img', 'target'\]"):
        read_dataset(str(path), image_column="image", label_column="target")
    with _error(r"has no column 'label' \(data.label_column\); columns are \['img', 'target'\]"):
        read_dataset(str(path), image_column="img", label_column="label")


def test_saved_dataset_unlabelled_records_fail_instead_of_wrapping(tmp_path):
    path = _save_hf(tmp_path / "hf", [0, -1])  # -1: ClassLabel's "no label"
    with _error(rf"Dataset {path} record 1: label -1 is not one of the data's own classes \['cat', 'dog', 'bird'\]"):
        read_dataset(str(path), image_column="img", label_column="target")


# ---------------------------------------------------------------- built-ins and bad specs


def test_builtin_digits():
    data = read_dataset("builtin:digits")
    assert len(data) == 1797 and data.kind == "array"
    assert data.class_names == [str(i) for i in range(10)] and set(data.labels) == set(range(10))
    assert data.items.shape == (1797, 8, 8) and data.items.dtype == np.uint8 and data.items.max() == 255
    sub = data.subset([0, 5, 10])
    assert sub.items.shape == (3, 8, 8) and sub.labels == [data.labels[0], data.labels[5], data.labels[10]]


def test_unknown_builtin_lists_the_builtins():
    with _error(r"builtin:nope is not a built-in dataset; the built-in datasets are \[.*'digits'.*\]") as info:
        read_dataset("builtin:nope")
    assert "'mnist-5k'" in str(info.value)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nowhere"
    with _error(rf"Data path {missing} does not exist; check data.train / data.val"):
        read_dataset(str(missing))
    with _error(r"Data path ./nowhere/labels.csv does not exist"):
        read_dataset("./nowhere/labels.csv")


def test_unsupported_file(tmp_path):
    path = tmp_path / "labels.xlsx"
    path.write_text("x")
    with _error(rf"{path}: unsupported data file"):
        read_dataset(str(path))


# ---------------------------------------------------------------- stratified split


def _labelled(counts: list[int]) -> LabeledImages:
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    return LabeledImages(
        [f"f{i}.png" for i in range(len(labels))], labels, [f"c{c}" for c in range(len(counts))], "mem"
    )


def test_split_is_seeded_and_stratified():
    counts = [40, 25, 12, 3]
    data = _labelled(counts)
    train, val = stratified_split(data, 0.25, seed=0)
    assert len(val) == 20 and len(train) == 60
    assert set(train.items).isdisjoint(val.items)
    assert sorted(train.items + val.items) == sorted(data.items)
    for item, label in zip(val.items + train.items, val.labels + train.labels, strict=True):
        assert data.labels[data.items.index(item)] == label  # labels travel with their items
    val_counts = Counter(val.labels)
    for c, n in enumerate(counts):
        assert abs(val_counts[c] - n * 0.25) <= 1
    again_train, again_val = stratified_split(data, 0.25, seed=0)
    assert again_val.items == val.items and again_train.items == train.items
    _, other_val = stratified_split(data, 0.25, seed=1)
    assert other_val.items != val.items


def test_split_with_singleton_class_still_covers_everything():
    data = _labelled([10, 1])
    train, val = stratified_split(data, 0.3, seed=0)
    assert len(val) == 3 and sorted(train.items + val.items) == sorted(data.items)


@pytest.mark.parametrize("fraction", [0.9, 0.92, 0.95])
def test_large_val_split_leaves_some_train(fraction):
    data = _labelled([2] * 10)  # 10 classes, 2 each: too few train samples to stratify
    train, val = stratified_split(data, fraction, seed=0)
    assert len(train) >= 1 and len(train) + len(val) == 20
    assert len(val) == round(fraction * 20)


@pytest.mark.parametrize("fraction,n", [(0.01, 20), (0.04, 10), (0.97, 10)])
def test_split_that_leaves_no_val_or_no_train(fraction, n):
    with _error(rf"data.val_split={fraction} leaves no train or no val samples from {n}; change it"):
        stratified_split(_labelled([n // 2, n - n // 2]), fraction, seed=0)


def test_builtin_digit_subset_renumbers_labels():
    from visiontune.core.readers import read_dataset

    data = read_dataset("builtin:mnist-5k:5-9")
    assert len(data) == 2500 and data.class_names == ["5", "6", "7", "8", "9"]
    assert sorted(set(data.labels)) == [0, 1, 2, 3, 4]
    assert read_dataset("builtin:digits:1,3").class_names == ["1", "3"]


@pytest.mark.parametrize("spec", ["builtin:digits:3-12", "builtin:digits:x", "builtin:digits:1,1"])
def test_builtin_digit_subset_rejects_bad_specs(spec):
    from visiontune.core.errors import DataError
    from visiontune.core.readers import read_dataset

    with pytest.raises(DataError, match="digit subset"):
        read_dataset(spec)


# ---------------------------------------------------------------- columns, encodings, stray quotes


def test_csv_and_jsonl_columns_named_by_image_and_label_column(meta):
    csv = meta / "labels.csv"
    csv.write_text("filepath,species\npics/r.png,red\npics/g.png,green\npics/b.png,blue\n")
    _check_rgb_records(
        read_dataset(str(csv), image_column="filepath", label_column="species"), meta, ["blue", "green", "red"]
    )
    with _error(r"needs columns `path` and `label` \(found \['filepath', 'species'\]\).*data.image_column"):
        read_dataset(str(csv))
    with _error(rf"{csv} has no column 'file' \(data.image_column\); its columns are \['filepath', 'species'\]"):
        read_dataset(str(csv), image_column="file", label_column="species")
    with _error(rf"{csv} has no column 'label' \(data.label_column\); its columns are \['filepath', 'species'\]"):
        read_dataset(str(csv), image_column="filepath", label_column="label")
    jsonl = meta / "labels.jsonl"
    rows = [("r", "red"), ("g", "green"), ("b", "blue")]
    jsonl.write_text("".join(json.dumps({"img": f"pics/{f}.png", "kind": k}) + "\n" for f, k in rows))
    data = read_dataset(str(jsonl), image_column="img", label_column="kind")
    _check_rgb_records(data, meta, ["blue", "green", "red"])
    with _error(rf"{jsonl} has no column 'label' \(data.label_column\); its columns are \['img', 'kind'\]"):
        read_dataset(str(jsonl), image_column="img", label_column="label")


def test_csv_header_names_are_stripped(meta):
    csv = meta / "labels.csv"
    csv.write_text("path, label\npics/r.png, red\npics/g.png, green\npics/b.png, blue\n")
    _check_rgb_records(read_dataset(str(csv)), meta, ["blue", "green", "red"])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_file_is_one_sentence_naming_it(meta, suffix):
    path = meta / f"labels{suffix}"
    record = {".csv": "path,label\npics/r.png,caf\u00e9\n", ".jsonl": '{"path": "pics/r.png", "label": "caf\u00e9"}\n'}
    path.write_bytes(record[suffix].encode("latin-1"))  # what a Windows spreadsheet saves by default
    line = 2 if suffix == ".csv" else 1
    with _error(rf"^{path} is not UTF-8 text \(line {line} has the byte 0xe9\); save it as UTF-8"):
        read_dataset(str(path))


def test_stray_quote_is_refused_naming_its_line(meta):
    csv = meta / "labels.csv"
    csv.write_text('path,label\npics/r.png,red\npics/g.png,"green\npics/b.png,blue\n')
    with _error(rf"^{csv} line 3 opens a quoted field that runs on to line 4, which means a stray quote"):
        read_dataset(str(csv))
    csv.write_text('path,label\r\npics/r.png,"red\r\n\r\npics/g.png,green"\r\npics/b.png,blue\r\n')
    with _error(rf"^{csv} line 2 opens a quoted field that runs on to line 4"):
        read_dataset(str(csv))
    csv.write_text('path,label\npics/r.png,"red, really"\npics/g.png,"green ""ish"""\n\npics/b.png,blue\n')
    data = read_dataset(str(csv))  # quoted commas and doubled quotes are fine
    assert data.class_names == ["blue", 'green "ish"', "red, really"]


def test_row_with_more_fields_than_the_header_is_named(meta):
    csv = meta / "labels.csv"
    csv.write_text("path,label\npics/r.png,red,\npics/g.png,green,extra\n")  # a trailing empty field is fine
    with _error(rf"^{csv} line 3 has 3 fields but the header has 2; quote a field that holds a comma"):
        read_dataset(str(csv))


# ---------------------------------------------------------------- one class is one class


def test_labels_are_normalised_so_one_class_is_one_class(meta):
    jsonl = meta / "labels.jsonl"
    labels = [1, 1.0, " 1 ", "1.0", 2, "cat ", "cat", -3.0, 0.5]
    jsonl.write_text("".join(json.dumps({"path": "pics/r.png", "label": v}) + "\n" for v in labels))
    data = read_dataset(str(jsonl))
    assert data.class_names == ["-3", "1", "2", "0.5", "cat"]
    assert [data.class_names[i] for i in data.labels] == ["1", "1", "1", "1", "2", "cat", "cat", "-3", "0.5"]
    csv = meta / "labels.csv"  # a pandas export writes 1.0 where the JSONL holds 1: same classes
    csv.write_text("path,label\npics/r.png,1.0\npics/g.png, 2\n")
    assert read_dataset(str(csv), class_names=data.class_names).labels == [1, 2]
    assert read_dataset(str(csv), class_names=["2.0", " 1"]).labels == [1, 0]  # the recipe's names too


def test_boolean_and_missing_labels_are_refused(meta):
    jsonl = meta / "labels.jsonl"
    jsonl.write_text('{"path": "pics/r.png", "label": 1}\n{"path": "pics/g.png", "label": true}\n')
    with _error(rf"^{jsonl} line 2: label True is a boolean, which could mean class 1 or class 'true'; write"):
        read_dataset(str(jsonl))
    jsonl.write_text('{"path": "pics/r.png", "label": 1}\n{"path": "pics/g.png", "label": NaN}\n')
    with _error(rf"^{jsonl} line 2 has no label; fill it in"):
        read_dataset(str(jsonl))
    jsonl.write_text('{"path": "pics/r.png", "label": ["a", "b"]}\n')
    with _error(rf"^{jsonl} line 1: label \['a', 'b'\] is a list, not one class"):
        read_dataset(str(jsonl))


def test_saved_dataset_number_labels_are_normalised(tmp_path):
    import datasets

    path = _save_hf(tmp_path / "hf", [1.0, 2.0, 1.0], label_feature=datasets.Value("float32"))
    data = read_dataset(str(path), label_column="target")
    assert data.class_names == ["1", "2"] and data.labels == [0, 1, 0]
    flags = _save_hf(tmp_path / "hf2", [True, False], label_feature=datasets.Value("bool"))
    with _error(rf"^Dataset {flags} record 0: label True is a boolean"):
        read_dataset(str(flags), label_column="target")


# ---------------------------------------------------------------- hidden files


def test_hidden_files_and_folders_are_not_samples(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "cat" / "1.png")
    _png(root / "cat" / ".ipynb_checkpoints" / "1-checkpoint.png")
    _png(root / "cat" / ".hidden.png")
    _png(root / "cat" / ".thumbs" / "1.png")
    (root / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07AppleDouble junk")  # macOS resource fork
    _png(root / "dog" / "sub" / "2.jpg")
    (root / "dog" / "sub" / "._2.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "__MACOSX" / "cat").mkdir(parents=True)  # what unzipping a macOS archive leaves behind
    (root / "__MACOSX" / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07")
    data = read_dataset(str(root))
    assert data.class_names == ["cat", "dog"]
    assert data.items == [root / "cat" / "1.png", root / "dog" / "sub" / "2.jpg"] and data.labels == [0, 1]
    (root / "cat" / "1.png").unlink()
    with _error(rf"Class folder {root / 'cat'} has no images"):
        read_dataset(str(root))


def test_a_validation_class_the_training_data_lacks_names_the_training_data(tmp_path):
    """The user never wrote data.class_names, so the message must not tell them to edit it."""
    from visiontune.classify.task import load_split
    from visiontune.recipe import parse_config

    for split, classes in (("train", ["cat", "dog"]), ("val", ["cat", "bird"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "a.png")
    raw = {"task": "classify", "model": "timm:resnet18", "output_dir": str(tmp_path / "run")}
    cfg = parse_config({**raw, "data": {"train": str(tmp_path / "train"), "val": str(tmp_path / "val")}})
    with _error(r"val/bird is not one of the training data's classes .*\['cat', 'dog'\]; remove the folder\.$"):
        load_split(cfg)
