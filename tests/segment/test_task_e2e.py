"""`task: segment` end to end on the tiny fixtures: CLI train (interrupted, then resumed to the weights of an
uninterrupted run) -> eval on another format -> predict (masks and overlays) with an FPN on the tiny timm CNN; bad
masks refused before a run folder exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visiontune.run.folder import last_checkpoint
from visiontune.run.trainer import VisiontuneTrainer
from visiontune.segment.config import SEGMENTATION_METRICS
from visiontune.testing.segment_fixtures import CLASSES, write_segmentation_sets


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    return write_segmentation_sets(tmp_path_factory.mktemp("masks"))


def _recipe(fixtures_dir: Path, sets: dict, out: Path, **sections) -> dict:
    recipe = {
        "task": "segment",
        "model": f"timm:local-dir:{fixtures_dir / 'timm-cnn'}",
        "decoder_channels": 16,
        "output_dir": str(out),
        "data": {"train": str(sets["ids"]), "val": str(sets["ids"]), "image_size": 32, "workers": 0},
        # best by loss: a tiny model's mIoU can tie between checkpoints, and either could be kept
        "train": {"max_steps": 4, "eval_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "metric": "loss"},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def _interrupt_at(monkeypatch, step: int) -> None:
    original = VisiontuneTrainer.training_step

    def step_then_stop(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(VisiontuneTrainer, "training_step", step_then_stop)


def test_train_interrupted_resumed_then_eval_and_predict(fixtures_dir, sets, write_recipe, cli, monkeypatch, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(_recipe(fixtures_dir, sets, run))
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        code, _, err = cli("train", recipe)
    assert code == 130 and "--resume" in err
    assert last_checkpoint(run).name == "checkpoint-2" and not (run / "model").exists()

    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    assert "Resuming from" in err and "step 2" in err
    whole = tmp_path / "uninterrupted"
    assert cli("train", write_recipe(_recipe(fixtures_dir, sets, whole), "whole.yaml"))[0] == 0
    resumed, uninterrupted = (load_file(str(r / "model" / "model.safetensors")) for r in (run, whole))
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["train_samples"] == 8 and summary["val_samples"] == 4
    for name in ("before", "after"):
        report = json.loads((run / "eval" / f"{name}.json").read_text())
        assert set(report["metrics"]) == set(SEGMENTATION_METRICS)
        assert [c["label"] for c in report["per_class_iou"]] == CLASSES and len(report["samples"]) == 4
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_miou" in row for row in logged)  # what train.metric selects the best checkpoint by
    report = (run / "report.md").read_text()
    for section in ("Masks on validation images", "Per-class IoU", "Confusion matrix"):
        assert section in report
    assert (run / "plots" / "masks.png").is_file() and (run / "model" / "visiontune.json").is_file()

    code, out, err = cli("eval", str(run), "--data", str(sets["voc"]))  # the same val images, as Pascal VOC
    assert code == 0, err
    scored = json.loads((run / "eval" / "cli" / "metrics.json").read_text())
    assert scored["metrics"] == pytest.approx(json.loads((run / "eval" / "after.json").read_text())["metrics"])

    image = sorted((sets["ids"] / "images" / "val").glob("*.png"))[0]
    code, out, err = cli("predict", str(run), str(image))
    assert code == 0, err
    assert str(image) in out and "%" in out
    mask = np.asarray(Image.open(run / "eval" / "predict" / f"0000-{image.stem}.png"))
    assert mask.shape == np.asarray(Image.open(image)).shape[:2] and mask.max() < len(CLASSES)
    assert (run / "eval" / "predict" / f"0000-{image.stem}-overlay.png").is_file()


def test_a_mask_with_an_unknown_label_is_refused_before_a_run_folder_exists(
    fixtures_dir, sets, write_recipe, cli, tmp_path
):
    bad = shutil.copytree(sets["ids"], tmp_path / "bad")
    mask_file = sorted((bad / "masks" / "train").glob("*.png"))[0]
    values = np.asarray(Image.open(mask_file)).copy()
    values[0, 0] = 9  # no class 9: four classes
    Image.fromarray(values).save(mask_file)
    run = tmp_path / "run"
    code, _, err = cli("train", write_recipe(_recipe(fixtures_dir, sets, run, data={"train": str(bad)})))
    assert code == 2 and mask_file.name in err and not run.exists()
