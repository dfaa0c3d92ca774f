"""Issue 15 for labelled images, end to end: files Pillow cannot read are named (console + data_report.json) and the
rest read (.jfif, .avif), a class left with nothing is refused, duplicates are counted, a resume on changed data is
refused before anything is written, and a BatchNorm model never trains on a last batch of one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.classify.config import ClassifyConfig
from visiontune.classify.task import load_split
from visiontune.core.errors import DataError
from visiontune.core.readers import read_dataset

HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # a HEIC header: Pillow has no reader


@pytest.fixture(autouse=True)
def _reports_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


def _images(folder: Path, n: int, seed: int, suffix: str = ".png") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{seed}_{i:02d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, format=_format(suffix))
        paths.append(path)
    return paths


def _format(suffix: str) -> str:
    return {".jfif": "JPEG", ".avif": "AVIF"}.get(suffix, suffix.removeprefix(".").upper())


def _mixed_folder(root: Path) -> Path:
    """Two classes of PNGs, plus a JPEG named .jfif, an AVIF, a HEIC and a text file."""
    _images(root / "cat", 8, 0)
    _images(root / "dog", 8, 1)
    _images(root / "cat", 1, 2, ".jfif")
    _images(root / "dog", 1, 3, ".avif")
    (root / "cat" / "phone.heic").write_bytes(HEIC)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_pillow_formats_are_read_and_the_rest_named(tmp_path):
    data = read_dataset(str(_mixed_folder(tmp_path / "imgs")))
    assert {Path(p).suffix for p in data.items} == {".png", ".jfif", ".avif"} and len(data) == 18
    assert data.left_out == [
        str(tmp_path / "imgs" / "cat" / "phone.heic"),
        str(tmp_path / "imgs" / "dog" / "notes.txt"),
    ]


def test_a_class_of_only_unreadable_files_is_refused(tmp_path):
    _images(tmp_path / "imgs" / "cat", 3, 0)
    (tmp_path / "imgs" / "dog").mkdir()
    for i in range(2):
        (tmp_path / "imgs" / "dog" / f"{i}.heic").write_bytes(HEIC)
    with pytest.raises(DataError, match=r"dog has no images; its 2 \.heic file\(s\) are not a format Pillow reads"):
        read_dataset(str(tmp_path / "imgs"))


def test_a_class_left_with_nothing_after_skipping_is_refused(tmp_path):
    _images(tmp_path / "imgs" / "cat", 6, 0)
    for path in _images(tmp_path / "imgs" / "dog", 6, 1):
        path.write_bytes(path.read_bytes()[:40])  # truncated: bad, skipped under on_bad_sample=skip
    cfg = ClassifyConfig(
        task="classify",
        model="timm:resnet18",
        output_dir=str(tmp_path / "run"),
        data={"train": str(tmp_path / "imgs"), "val_split": 0.25, "on_bad_sample": "skip", "workers": 0},
    )
    with pytest.raises(DataError, match=r"^Class\(es\) \['dog'\] have no usable training image"):
        load_split(cfg)


def test_report_names_left_out_files_and_duplicates_and_resume_refuses_changed_data(
    tiny_recipe, write_recipe, cli, tmp_path
):
    root = _mixed_folder(tmp_path / "imgs")
    shutil.copy(root / "cat" / "0_00.png", root / "cat" / "copy.png")  # one duplicate: counted, kept on one side
    recipe = tiny_recipe(data={"train": str(root)}, train={"epochs": 1})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    assert "Left out 2 file(s) that are not a format Pillow reads:" in err and "phone.heic" in err
    run = Path(recipe["output_dir"])
    report = json.loads((run / "data_report.json").read_text())
    assert report["left_out"] == [str(root / "cat" / "phone.heic"), str(root / "dog" / "notes.txt")]
    assert sum(report["duplicates"].values()) == 1 and report["train_samples"] + report["val_samples"] == 19
    assert report["data"]["classes"] == ["cat", "dog"]

    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _images(root / "dog", 2, 9)  # images added after the run started
    code, _, err = cli("train", write_recipe(recipe), "--resume")
    assert code == 2 and "--resume: the data changed since the run started (train records" in err
    _images(root / "bird", 4, 10)  # and a class
    code, _, err = cli("train", write_recipe(recipe), "--resume")
    assert code == 2 and "classes now ['bird', 'cat', 'dog'], were ['cat', 'dog']" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written


def test_batchnorm_model_never_trains_on_a_last_batch_of_one(tiny_recipe, fixtures_dir, write_recipe, cli):
    """33 training images in batches of 8 leave one: test_efficientnet's BatchNorm failed on it after epoch 1."""
    recipe = tiny_recipe(model=str(fixtures_dir / "timm-cnn"), data={"val_split": 3 / 36}, train={"epochs": 2})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    summary = json.loads((Path(recipe["output_dir"]) / "summary.json").read_text())
    assert summary["train_samples"] == 33 and summary["global_step"] == 8  # 4 full batches per epoch
