"""Every CLIP task and mode under `--nproc 2`: one run folder, outputs written once by rank 0 after the model they
read exists (export_state_to and WiSE-FT read `model/`), ranks that trained in step."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import train_two_ranks

NAMES = ["red", "green", "blue"]


def _classify(fixtures_dir: Path, out: Path, **extra) -> dict:
    recipe = {
        "task": "clip_classify",
        "model": str(fixtures_dir / "clip"),
        "output_dir": str(out),
        "data": {"train": str(fixtures_dir / "images"), "val_split": 0.25, "workers": 0, "prompt_names": NAMES},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1},
    }
    return recipe | extra


def _same_weights(records: list[dict]) -> bool:
    return records[0]["weight_checksum"] == pytest.approx(records[1]["weight_checksum"], rel=1e-6)


def test_clip_classify_with_export_state_and_wise_ft(fixtures_dir, tmp_path, write_recipe):
    state = tmp_path / "vision.safetensors"
    recipe = _classify(fixtures_dir, tmp_path / "run", export_state_to=str(state), wise_ft={"alphas": [0.0, 1.0]})
    records = train_two_ranks(write_recipe(recipe))
    assert [r["world_size"] for r in records] == [2, 2] and _same_weights(records)
    assert state.is_file() and (tmp_path / "run" / "wise_ft_model").is_dir()


def test_clip_classify_skip_training(fixtures_dir, tmp_path, write_recipe):
    raw = _classify(fixtures_dir, tmp_path / "run", skip_training=True)
    del raw["train"], raw["data"]["workers"]  # they act only when training
    recipe = write_recipe(raw)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "visiontune", "train", str(recipe), "--nproc", "2"]
    proc = subprocess.run(cmd, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in json.loads((tmp_path / "run" / "eval" / "after.json").read_text())["metrics"]


def test_clip_continual(fixtures_dir, tmp_path, write_recipe):
    import shutil

    subsets = []
    for name, classes in (("first", [0, 1]), ("second", [1, 2])):
        for c in classes:
            shutil.copytree(fixtures_dir / "images" / f"class_{c}", tmp_path / name / f"class_{c}")
        subsets.append(tmp_path / name)
    recipe = {
        "task": "clip_continual",
        "model": str(fixtures_dir / "clip"),
        "output_dir": str(tmp_path / "run"),
        "tasks": [{"name": "a", "train": str(subsets[0])}, {"name": "b", "train": str(subsets[1])}],
        "data": {"val_split": 0.25, "workers": 0},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1},
    }
    path = write_recipe(recipe)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "visiontune", "train", str(path), "--nproc", "2"]
    proc = subprocess.run(cmd, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert len(json.loads((run / "eval" / "continual.json").read_text())["matrix"]) == 2
    for stage in ("0-a", "1-b"):
        records = [json.loads((run / "stages" / stage / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert _same_weights(records)


def test_clip_contrastive(fixtures_dir, tmp_path, write_recipe):
    images = fixtures_dir / "images"
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for c, colour in enumerate(NAMES):
            for file in sorted((images / f"class_{c}").glob("*.png")):
                writer.writerow([str(file), f"a {colour} image"])
    recipe = {
        "task": "clip_contrastive",
        "model": str(fixtures_dir / "clip"),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(captions), "val_split": 0.25, "workers": 0},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1},
    }
    records = train_two_ranks(write_recipe(recipe))
    assert _same_weights(records)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["task"] == "clip_contrastive"
