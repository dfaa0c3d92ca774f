"""clip_continual: a task sequence on the tiny CLIP fixture, the accuracy matrix and its summary metrics."""

import json
import shutil
from pathlib import Path

import pytest

from visiontune.clip.continual import continual_metrics


def _subset(fixtures_dir: Path, out: Path, classes: list[int]) -> Path:
    for c in classes:
        shutil.copytree(fixtures_dir / "images" / f"class_{c}", out / f"class_{c}")
    return out


def test_matrix_metrics_by_hand():
    matrix = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.75, 0.95]]
    m = continual_metrics(matrix)
    assert m["average_accuracy"] == pytest.approx((0.6 + 0.75 + 0.95) / 3)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.75)) / 2)
    assert m["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.75 - 0.8)) / 2)


def test_two_task_sequence_writes_matrix_and_report(fixtures_dir, tmp_path, write_recipe, cli):
    first = _subset(fixtures_dir, tmp_path / "first", [0, 1])
    second = _subset(fixtures_dir, tmp_path / "second", [1, 2])
    recipe = {
        "task": "clip_continual",
        "model": str(fixtures_dir / "clip"),
        "output_dir": str(tmp_path / "run"),
        "tasks": [
            {"name": "red-green", "train": str(first), "prompt_names": ["red", "green"]},
            {"name": "green-blue", "train": str(second), "prompt_names": ["green", "blue"]},
        ],
        "data": {"templates": ["a photo of a {}"], "val_split": 0.25, "workers": 0},
        "train": {"epochs": 1, "batch_size": 6, "lr": 1e-3, "logging_steps": 1},
    }
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    result = json.loads((run / "eval/continual.json").read_text())
    assert result["tasks"] == ["red-green", "green-blue"]
    matrix = result["matrix"]
    assert len(matrix) == 2 and matrix[0][1] is None and all(v is not None for v in matrix[1])
    assert all(0 <= v <= 1 for row in matrix for v in row if v is not None)
    assert len(result["zero_shot"]) == 2 and "forgetting" in result
    for i, name in enumerate(result["tasks"]):
        assert (run / "stages" / f"{i}-{name}" / "trainable.safetensors").is_file()
        assert (run / "stages" / f"{i}-{name}" / "metrics.jsonl").is_file()
    assert (run / "plots/continual_matrix.png").is_file()
    assert "Continual accuracy matrix" in (run / "report.md").read_text()
    assert (run / "model" / "visiontune.json").is_file()


def test_task_without_data_is_named(fixtures_dir, tmp_path, write_recipe, cli):
    (tmp_path / "empty").mkdir()
    recipe = {
        "task": "clip_continual",
        "model": str(fixtures_dir / "clip"),
        "output_dir": str(tmp_path / "run"),
        "tasks": [
            {"name": "ok", "train": str(fixtures_dir / "images")},
            {"name": "hollow", "train": str(tmp_path / "empty")},
        ],
    }
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 2 and "hollow" in err and "Traceback" not in err


def test_sequence_needs_two_distinct_tasks(fixtures_dir, tmp_path, write_recipe, cli):
    recipe = {
        "task": "clip_continual",
        "model": "m",
        "output_dir": str(tmp_path / "run"),
        "tasks": [{"name": "a", "train": "x"}, {"name": "a", "train": "y"}],
    }
    code, _, err = cli("validate", write_recipe(recipe))
    assert code == 2 and "distinct" in err


def _two_tasks(fixtures_dir: Path, tmp_path: Path, **train) -> dict:
    first = _subset(fixtures_dir, tmp_path / "first", [0, 1])
    second = _subset(fixtures_dir, tmp_path / "second", [1, 2])
    return {
        "task": "clip_continual",
        "model": str(fixtures_dir / "clip"),
        "output_dir": str(tmp_path / "run"),
        "tasks": [{"name": "a", "train": str(first)}, {"name": "b", "train": str(second)}],
        "data": {"templates": ["a photo of a {}"], "val_split": 0.25, "workers": 0},
        "train": {"epochs": 1, "batch_size": 6, "lr": 1e-3, "logging_steps": 1, **train},
    }


def _stop_at_second_stage(monkeypatch) -> list[str]:
    """Interrupt (Ctrl-C) the second stage once, when its Trainer would be built; the stages built are listed."""
    from visiontune.clip import continual

    real, built = continual.ClipContinualTask.build_stage, []

    def build_stage(self, cfg, data, clf, index, folder):
        if folder.name == "1-b" and "interrupted" not in built:
            built.append("interrupted")
            raise KeyboardInterrupt
        built.append(folder.name)
        return real(self, cfg, data, clf, index, folder)

    monkeypatch.setattr(continual.ClipContinualTask, "build_stage", build_stage)
    return built


def test_resume_continues_in_the_middle_of_the_sequence(fixtures_dir, tmp_path, write_recipe, cli, monkeypatch):
    """Stop after the first task has finished; --resume trains only the second and gives the same matrix shape."""
    recipe = _two_tasks(fixtures_dir, tmp_path)
    path = write_recipe(recipe)
    built = _stop_at_second_stage(monkeypatch)
    assert cli("train", path)[0] == 130
    assert built == ["0-a", "interrupted"]
    code, out, err = cli("train", path, "--resume")
    assert code == 0, err
    assert built == ["0-a", "interrupted", "1-b"] and "after stage 1 of 2" in out + err
    run = Path(recipe["output_dir"])
    result = json.loads((run / "eval/continual.json").read_text())
    assert len(result["matrix"]) == 2 and "forgetting" in result
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["a", "b"] and summary["task"] == "clip_continual"
    assert summary["global_step"] == sum(s["global_step"] for s in summary["stages"]) > 0
    assert summary["final_metrics"]["accuracy"] == pytest.approx(result["average_accuracy"])


def test_resume_refuses_a_changed_recipe(fixtures_dir, tmp_path, write_recipe, cli, monkeypatch):
    recipe = _two_tasks(fixtures_dir, tmp_path)
    _stop_at_second_stage(monkeypatch)
    assert cli("train", write_recipe(recipe))[0] == 130
    recipe["train"]["lr"] = 5e-3
    code, _, err = cli("train", write_recipe(recipe), "--resume")
    assert code == 2 and "train.lr" in err and "Traceback" not in err


def test_ema_weights_are_scored_and_the_report_is_written_once(fixtures_dir, tmp_path, write_recipe, cli, monkeypatch):
    """train.ema acts in every stage (the averaged weights are evaluated against the trained ones); the report is
    written once, at the end, from the full summary."""
    import visiontune.report as report

    written = []
    real = report.write_report
    monkeypatch.setattr(report, "write_report", lambda run_dir: written.append(run_dir) or real(run_dir))
    recipe = _two_tasks(fixtures_dir, tmp_path, ema={"decay": 0.5})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    for stage in ("0-a", "1-b"):
        logged = (run / "stages" / stage / "metrics.jsonl").read_text()
        assert "final_ema_accuracy" in logged and "final_trained_accuracy" in logged
    summary = json.loads((run / "summary.json").read_text())
    assert all(s["weights"] in ("ema", "trained") for s in summary["stages"])
    assert written == [run]
    assert "Continual accuracy matrix" in (run / "report.md").read_text()


def test_refused_launch_leaves_no_run_folder(fixtures_dir, tmp_path, write_recipe, cli, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # accelerate's silent single-process launch
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    recipe = _two_tasks(fixtures_dir, tmp_path)
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 2 and "single process" in err
    assert not Path(recipe["output_dir"]).exists()


def test_resume_refuses_changed_data_and_overwrite_waits_for_the_model(
    fixtures_dir, tmp_path, write_recipe, cli, monkeypatch
):
    recipe = _two_tasks(fixtures_dir, tmp_path)
    path = write_recipe(recipe)
    _stop_at_second_stage(monkeypatch)
    assert cli("train", path)[0] == 130
    run = Path(recipe["output_dir"])
    extra = next((tmp_path / "second" / "class_1").glob("*.png"))
    shutil.copy(extra, extra.with_name("added.png"))
    code, _, err = cli("train", path, "--resume")
    assert code == 2 and "data changed" in err
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a model folder that fails only when loaded
    code, _, err = cli("train", path, f"model={broken}", "--overwrite")
    assert code != 0 and "Traceback" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # a failed start leaves the old run
