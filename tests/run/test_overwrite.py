"""`--overwrite` removes only what the previous run recorded writing: never a run nested inside it, a user's file, a
symlink's target or an input of the new run, and only once the new run has its data and model."""

import json
import shutil
from pathlib import Path

import pytest

from visiontune.core.errors import RunDirError
from visiontune.run.folder import LOCK, MARKER, prepare_run_dir


def _tree(path: Path) -> dict[str, bytes]:
    """Every file's bytes, the lock file aside (each run that takes the folder writes its pid there)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != LOCK}


def _finished_run(path: Path) -> Path:
    prepare_run_dir(path, overwrite=False, resume=False)
    for name in ("checkpoints/checkpoint-2/trainer_state.json", "model/model.safetensors", "eval/after.json"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("{}")
    (path / "summary.json").write_text("{}")
    return path


def test_overwrite_keeps_a_run_nested_two_levels_down_and_user_files(tmp_path, capsys):
    parent = _finished_run(tmp_path / "parent")
    nested = _finished_run(parent / "sweeps" / "lr1")
    (parent / "notes.txt").write_text("mine")
    kept = _tree(nested)
    prepare_run_dir(parent, overwrite=True, resume=False)
    assert _tree(nested) == kept and (parent / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in parent.iterdir() if not p.name.startswith(".")) == ["notes.txt", "sweeps"]
    err = capsys.readouterr().err
    assert "notes.txt" in err and "sweeps" in err and len(err.strip().splitlines()) == 1


def test_overwrite_keeps_a_written_folder_that_now_holds_another_run(tmp_path):
    parent = _finished_run(tmp_path / "parent")
    inner = _finished_run(parent / "eval" / "inner")  # a later run pointed inside the first one's eval/
    kept = _tree(inner)
    prepare_run_dir(parent, overwrite=True, resume=False)
    assert _tree(inner) == kept and not (parent / "model").exists()


def test_the_marker_records_what_the_run_writes(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, overwrite=False, resume=False)
    writes = json.loads((run / MARKER).read_text())["writes"]
    assert {"model", "checkpoints", "summary.json", "config.yaml", "eval", "metrics.jsonl"} <= set(writes)
    assert MARKER not in writes


def test_an_entry_present_when_the_run_started_is_not_the_runs(tmp_path):
    parent = _finished_run(tmp_path / "parent")
    (parent / "data").mkdir()
    (parent / "data" / "a.png").write_bytes(b"png")
    prepare_run_dir(parent, overwrite=True, resume=False)  # data/ was there when this run started: not recorded
    assert "data" not in json.loads((parent / MARKER).read_text())["writes"]
    assert (parent / "data" / "a.png").read_bytes() == b"png"


def test_an_old_marker_without_a_record_removes_only_known_run_files(tmp_path):
    run = _finished_run(tmp_path / "run")
    (run / MARKER).write_text(json.dumps({"visiontune": "0.1", "kind": "run"}))  # written before records existed
    (run / "notes.txt").write_text("mine")
    prepare_run_dir(run, overwrite=True, resume=False)
    assert (run / "notes.txt").read_text() == "mine" and not (run / "model").exists()


def test_overwrite_never_follows_or_removes_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weights.bin").write_bytes(b"w")
    run = _finished_run(tmp_path / "run")
    shutil.rmtree(run / "model")
    (run / "model").symlink_to(outside)
    (run / "eval" / "link").symlink_to(outside)
    prepare_run_dir(run, overwrite=True, resume=False)
    assert (outside / "weights.bin").read_bytes() == b"w"
    assert (run / "model").is_symlink() and not (run / "eval").exists()


def test_an_input_inside_what_the_previous_run_wrote_is_refused(tmp_path):
    run = _finished_run(tmp_path / "run")
    before = _tree(run)
    with pytest.raises(RunDirError, match=r"model/model.safetensors|run/model") as info:
        prepare_run_dir(run, overwrite=True, resume=False, inputs=[run / "model"])
    assert "input" in str(info.value) and "new output_dir" in str(info.value)
    assert _tree(run) == before


# ---- end to end, as a user runs it


def test_overwrite_keeps_a_data_folder_inside_the_run_and_trains_on_it(tiny_recipe, write_recipe, cli, fixtures_dir):
    recipe = tiny_recipe(train={"max_steps": 1})
    run = Path(recipe["output_dir"])
    assert cli("train", write_recipe(recipe))[0] == 0
    shutil.copytree(fixtures_dir / "images", run / "data")
    data = _tree(run / "data")
    recipe["data"]["train"] = str(run / "data")
    code, _, err = cli("train", write_recipe(recipe), "--overwrite")
    assert code == 0, err
    assert _tree(run / "data") == data and (run / "model").is_dir()
    assert "data" in err.split("did not write")[-1]


def test_overwrite_refuses_to_replace_the_model_it_trains(tiny_recipe, write_recipe, cli):
    recipe = tiny_recipe(train={"max_steps": 1})
    run = Path(recipe["output_dir"])
    assert cli("train", write_recipe(recipe))[0] == 0
    before = _tree(run)
    code, _, err = cli("train", write_recipe(recipe), f"model={run / 'model'}", "--overwrite")
    assert code == 2 and "Traceback" not in err and "input" in err, err
    assert _tree(run) == before


def test_a_failed_start_after_overwrite_leaves_the_old_run_intact(tiny_recipe, write_recipe, cli, monkeypatch):
    from visiontune.classify.task import ClassifyTask

    recipe = tiny_recipe(train={"max_steps": 1})
    run = Path(recipe["output_dir"])
    assert cli("train", write_recipe(recipe))[0] == 0
    before = _tree(run)

    def fail(*args, **kwargs):
        raise RunDirError("the model could not be loaded.")

    monkeypatch.setattr(ClassifyTask, "build", fail)
    code, _, err = cli("train", write_recipe(recipe), "--overwrite")
    assert code == 2 and "could not be loaded" in err
    assert _tree(run) == before


# ---- --resume with --overwrite


def test_resume_with_overwrite_is_refused_in_one_sentence(tiny_recipe, write_recipe, cli):
    recipe = tiny_recipe(train={"max_steps": 1})
    run = Path(recipe["output_dir"])
    assert cli("train", write_recipe(recipe))[0] == 0
    before = _tree(run)
    code, _, err = cli("train", write_recipe(recipe), "--resume", "--overwrite")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--resume" in lines[0] and "--overwrite" in lines[0], err
    assert _tree(run) == before


def test_the_library_refuses_the_pair_too(tiny_recipe):
    from visiontune.recipe import get_task, parse_config

    cfg = parse_config(tiny_recipe(), source="test")
    with pytest.raises(RunDirError, match="only one of them"):
        get_task("classify").train(cfg, overwrite=True, resume=True)
    assert not Path(cfg.output_dir).exists()


def test_overwrite_outranks_the_recipes_resume_key_and_says_so(tiny_recipe, write_recipe, cli):
    recipe = tiny_recipe(train={"max_steps": 2, "eval_steps": 1, "resume": True})
    assert cli("train", write_recipe(recipe))[0] == 0
    code, _, err = cli("train", write_recipe(recipe), "--overwrite")
    assert code == 0, err
    assert "Resuming" not in err and "train.resume" in err
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").open()]
    assert sum("before_loss" in row for row in rows) == 1  # evaluated before training: a fresh run, in a fresh file
