"""`task: detect` end to end on the tiny fixtures: CLI train -> eval -> predict (torchvision FCOS on the tiny timm CNN),
a transformers DETR run whose export plain transformers loads, resume after an interruption, bad data refused before
a run folder exists, two DDP ranks in step."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.conftest import train_two_ranks
from tests.detect.conftest import detect_recipe
from visiontune.detect.config import DETECTION_METRICS
from visiontune.run.folder import last_checkpoint
from visiontune.run.trainer import VisiontuneTrainer
from visiontune.testing.detect_fixtures import CLASSES, COCO_IDS


def test_after_reuses_the_last_validation_of_the_same_weights(
    fixtures_dir, box_sets, write_recipe, cli, monkeypatch, tmp_path
):
    """Detection runs its own evaluation loop (records, not tensors): the "after" evaluation of the weights the
    last validation scored is not run again, and after.json is still the full report."""
    from visiontune.detect.task import DetectionTrainer

    passes = []
    collect = DetectionTrainer.collect

    def spy(model, loader, prepare):
        passes.append(len(loader.dataset))
        return collect(model, loader, prepare)

    monkeypatch.setattr(DetectionTrainer, "collect", staticmethod(spy))
    recipe = detect_recipe(fixtures_dir, box_sets, tmp_path / "run", train={"epochs": 1})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    assert passes == [4, 4]  # "before" and the epoch's validation; no third pass for "after"
    run = tmp_path / "run"
    after = json.loads((run / "eval" / "after.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [row for row in logged if "eval_map_50" in row][-1]
    assert after["metrics"]["map_50"] == validation["eval_map_50"]
    assert len(after["samples"]) == 4 and [c["label"] for c in after["per_class_ap"]] == CLASSES


def test_cli_train_eval_predict(fixtures_dir, box_sets, write_recipe, cli, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", write_recipe(detect_recipe(fixtures_dir, box_sets, run, train={"metric": "map_50"})))
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "detect" and summary["train_samples"] == 8 and summary["val_samples"] == 4
    for name in ("before", "after"):
        report = json.loads((run / "eval" / f"{name}.json").read_text())
        assert set(report["metrics"]) == set(DETECTION_METRICS)
        assert [c["label"] for c in report["per_class_ap"]] == CLASSES and len(report["samples"]) == 4
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_map_50" in row for row in logged)  # what train.metric selects the best checkpoint by
    report = (run / "report.md").read_text()
    assert "Per-class AP" in report and "mAP@.5" in report
    assert (run / "plots" / "detections.png").is_file() and (run / "plots" / "pr_curves.png").is_file()
    manifest = json.loads((run / "model" / "visiontune.json").read_text())
    assert manifest["kind"] == "detector" and manifest["category_ids"] == COCO_IDS
    results = json.loads((run / "eval" / "predictions.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(COCO_IDS)

    code, out, err = cli("eval", run, "--data", box_sets["yolo"])  # any format; YOLO's val split
    assert code == 0, err
    assert "map_50" in out and (run / "eval" / "cli" / "metrics.json").is_file()

    image = sorted((box_sets["coco-val"].parent / "images").glob("*.png"))[0]
    code, out, err = cli("predict", run, image, "--conf", "0.0", "--out", tmp_path / "pred")
    assert code == 0, err
    assert str(image) in out and any(name in out for name in CLASSES)
    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert predicted and {p["image_id"] for p in predicted} == {0} and len(list((tmp_path / "pred").glob("*.png"))) == 1


def test_transformers_detector_run_exports_for_plain_transformers(fixtures_dir, box_sets, tmp_path):
    from transformers import AutoModelForObjectDetection

    from visiontune.detect.task import DetectTask
    from visiontune.recipe import parse_config

    recipe = detect_recipe(
        fixtures_dir, box_sets, tmp_path / "run", model=str(fixtures_dir / "detr"), train={"epochs": 1}
    )
    del recipe["fpn_channels"]
    run = DetectTask().train(parse_config(recipe))
    model = AutoModelForObjectDetection.from_pretrained(run / "model")
    assert model.config.id2label == dict(enumerate(CLASSES))
    assert json.loads((run / "eval" / "after.json").read_text())["metrics"]["map"] >= 0


def _interrupt_at(monkeypatch, step: int) -> None:
    original = VisiontuneTrainer.training_step

    def step_then_stop(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(VisiontuneTrainer, "training_step", step_then_stop)


def test_resume_after_an_interruption_trains_as_the_uninterrupted_run(
    fixtures_dir, box_sets, write_recipe, cli, monkeypatch, tmp_path
):
    train = {"max_steps": 6, "eval_steps": 3, "save_total_limit": 5}
    # Augmentation on, mosaic too: each item draws from (seed, epoch, index), which the resumed run replays. Batch 4
    # of 8 images: the cut falls in the second epoch, which the resumed run starts again from its sampler.
    augment = {"augment": {"preset": "strong", "mosaic": 0.5}}
    full = detect_recipe(fixtures_dir, box_sets, tmp_path / "full", train=train, data=augment)
    assert cli("train", write_recipe(full, "full.yaml"))[0] == 0
    cut = detect_recipe(fixtures_dir, box_sets, tmp_path / "cut", train=train, data=augment)
    recipe = write_recipe(cut, "cut.yaml")
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        code, _, err = cli("train", recipe)
    assert code == 130 and "--resume" in err
    assert last_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    # checkpoint-6 was trained after the cut in one run and straight through in the other
    a = load_file(str(tmp_path / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_bad_annotation_stops_before_a_run_folder_exists(fixtures_dir, box_sets, write_recipe, cli, tmp_path):
    coco = json.loads(box_sets["coco-train"].read_text())
    coco["annotations"][0]["bbox"] = [10, 10, 0, 5]
    bad = box_sets["coco-train"].with_name("zero-area.json")
    bad.write_text(json.dumps(coco))
    recipe = detect_recipe(fixtures_dir, box_sets, tmp_path / "run", data={"train": str(bad)})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 2 and "zero area" in err and str(bad) in err
    assert not (tmp_path / "run").exists()


def test_two_ranks_train_in_step_and_export_once(fixtures_dir, box_sets, write_recipe, tmp_path):
    recipe = detect_recipe(fixtures_dir, box_sets, tmp_path / "ddp", train={"epochs": 1, "batch_size": 2})
    ranks = train_two_ranks(write_recipe(recipe))
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["samples_seen"] == 4 for r in ranks)
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "ranks ended with different weights"
    run = tmp_path / "ddp"
    assert (run / "model" / "model.safetensors").is_file() and (run / "report.md").is_file()
    after = json.loads((run / "eval" / "after.json").read_text())
    assert sorted(s["image_id"] for s in after["samples"]) == [0, 1, 2, 3]  # every val image scored once


def test_detection_options_are_refused_for_a_classifier(cli, fixtures_dir, tmp_path):
    code, _, err = cli("predict", fixtures_dir / "timm-vit", tmp_path / "x.png", "--conf", "0.3")
    assert code == 2 and "--conf" in err and "classify" in err
