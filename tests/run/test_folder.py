"""Run and output folders: --overwrite only ever deletes what a visiontune run made; checkpoints are saved durably and a
failed save keeps the previous one."""

import errno
import json
import os
import sys
from pathlib import Path

import pytest

from visiontune.core.errors import RunDirError
from visiontune.run import folder
from visiontune.run.folder import (
    LOCK,
    MARKER,
    last_checkpoint,
    marker_kind,
    prepare_output_folder,
    prepare_run_dir,
    save_error,
)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _user_folder(path: Path) -> Path:
    """A folder visiontune did not make: a recipe and some data."""
    (path / "data" / "cat").mkdir(parents=True)
    (path / "data" / "cat" / "1.png").write_bytes(b"png")
    (path / "recipe.yaml").write_text("task: classify\n")
    return path


def _finished_run(path: Path, step: int = 2) -> Path:
    prepare_run_dir(path, overwrite=False, resume=False)
    ckpt = path / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (path / "model").mkdir()
    (path / "summary.json").write_text("{}")
    return path


def test_fresh_run_folder_gets_a_marker(tmp_path):
    run = tmp_path / "runs" / "a"
    assert prepare_run_dir(run, overwrite=False, resume=False) is None
    marker = json.loads((run / MARKER).read_text())
    assert marker["kind"] == "run" and marker["visiontune"] and marker["created"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_not_made_by_visiontune_is_left_alone(tmp_path, overwrite):
    target = _user_folder(tmp_path / "mine")
    before = _tree(target)
    with pytest.raises(RunDirError, match="not made by visiontune") as info:
        prepare_run_dir(target, overwrite=overwrite, resume=False)
    assert str(target) in str(info.value) and "left alone" in str(info.value)
    assert _tree(target) == before and not (target / MARKER).exists()


def test_parent_of_runs_is_refused(tmp_path):
    runs = tmp_path / "runs"
    _finished_run(runs / "a")
    before = _tree(runs)
    with pytest.raises(RunDirError, match="not made by visiontune"):
        prepare_run_dir(runs, overwrite=True, resume=False)
    assert _tree(runs) == before


def test_overwrite_keeps_the_runs_a_run_holds(tmp_path):
    outer = _finished_run(tmp_path / "outer")
    inner = _finished_run(outer / "inner")  # a later run was pointed inside the first one
    before = _tree(inner)
    prepare_run_dir(outer, overwrite=True, resume=False)
    assert _tree(inner) == before and not (outer / "model").exists()


@pytest.mark.parametrize("spec", [".", "", "..", Path("")])
def test_working_folder_is_refused(tmp_path, monkeypatch, spec):
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    with pytest.raises(RunDirError, match="working folder|is empty"):
        prepare_run_dir(spec, overwrite=True, resume=False)
    assert _tree(tmp_path) == before


def test_empty_string_names_the_key(tmp_path):
    with pytest.raises(RunDirError, match="output_dir is empty"):
        prepare_run_dir("", overwrite=False, resume=False)


def test_existing_empty_folder_is_used(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert prepare_run_dir(run, overwrite=False, resume=False) is None
    assert marker_kind(run) == "run"


def test_run_that_failed_early_is_reused_without_overwrite(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, overwrite=False, resume=False)
    (run / "config.yaml").write_text("task: classify\n")
    (run / "data_report.json").write_text("{}")
    (run / "checkpoints" / ".partial" / "checkpoint-2").mkdir(parents=True)
    assert prepare_run_dir(run, overwrite=False, resume=False) is None
    assert sorted(p.name for p in run.iterdir()) == [LOCK, MARKER]


@pytest.mark.parametrize("work", ["checkpoint", "model"])
def test_run_with_a_checkpoint_or_model_needs_overwrite(tmp_path, work):
    run = _finished_run(tmp_path / "run")
    if work == "model":
        (run / "checkpoints").rename(tmp_path / "moved")  # a run saved without checkpoints still has its model
    before = _tree(run)
    with pytest.raises(RunDirError, match="already exists.*--overwrite"):
        prepare_run_dir(run, overwrite=False, resume=False)
    assert _tree(run) == before
    assert prepare_run_dir(run, overwrite=True, resume=False) is None
    assert sorted(p.name for p in run.iterdir()) == [LOCK, MARKER]


def test_overwrite_keeps_the_folder_itself(tmp_path):
    run = _finished_run(tmp_path / "run")
    inode = run.stat().st_ino  # emptied in place: it may be a shell's working folder
    prepare_run_dir(run, overwrite=True, resume=False)
    assert run.stat().st_ino == inode


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    prepare_run_dir(Path("~/runs/a"), overwrite=False, resume=False)
    assert marker_kind(tmp_path / "home" / "runs" / "a") == "run"
    assert not (tmp_path / "~").exists()
    assert last_checkpoint(Path("~/runs/a")) is None


def test_symlink_file_and_file_in_path_each_get_one_sentence(tmp_path):
    real = _finished_run(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    before = _tree(real)
    with pytest.raises(RunDirError, match="symbolic link"):
        prepare_run_dir(link, overwrite=True, resume=False)
    assert _tree(real) == before
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        prepare_run_dir(file, overwrite=True, resume=False)
    with pytest.raises(RunDirError, match="Cannot create .*no file sits in its path"):
        prepare_run_dir(file / "run", overwrite=False, resume=False)
    assert file.read_text() == "keep"


def test_resume_drops_torn_saves_and_keeps_checkpoints(tmp_path):
    run = _finished_run(tmp_path / "run")
    torn = run / "checkpoints" / ".partial" / "checkpoint-4"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"half")
    assert prepare_run_dir(run, overwrite=False, resume=True) == run / "checkpoints" / "checkpoint-2"
    assert not (run / "checkpoints" / ".partial").exists()
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()


def test_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    out = prepare_output_folder(Path("~/merged"), "merge --out")
    assert out == tmp_path / "merged" and marker_kind(out) == "merge --out"
    (out / "model.safetensors").write_bytes(b"w")
    assert prepare_output_folder(out, "merge --out") == out  # its own earlier output may be rewritten
    empty = tmp_path / "empty"
    empty.mkdir()
    assert marker_kind(prepare_output_folder(empty, "compare --out")) == "compare --out"


def test_output_folder_refuses_foreign_and_other_kinds(tmp_path):
    mine = _user_folder(tmp_path / "mine")
    before = _tree(mine)
    with pytest.raises(RunDirError, match="merge --out: .*mine holds files and was not made by visiontune"):
        prepare_output_folder(mine, "merge --out")
    assert _tree(mine) == before
    run = _finished_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="holds a visiontune `run` output"):
        prepare_output_folder(run, "merge --out")
    assert marker_kind(run) == "run"


def test_merge_refuses_a_foreign_out_before_loading_models(tmp_path, monkeypatch):
    from visiontune.clip import merge_eval

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model although the output folder is refused")

    monkeypatch.setattr(merge_eval, "resolve_dual_encoder", no_load)
    mine = _user_folder(tmp_path / "mine")
    before = _tree(mine)
    with pytest.raises(RunDirError, match="not made by visiontune"):
        merge_eval.merge_clip("base", ["a", "b"], "average", mine, [])
    assert _tree(mine) == before


def test_save_error_recognises_a_full_disk_reported_as_runtime_error(tmp_path, monkeypatch):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    usage = folder.shutil.disk_usage(tmp_path)
    assert save_error(tmp_path, "checkpoint-4", RuntimeError("a bug")) is None
    monkeypatch.setattr(folder.shutil, "disk_usage", lambda p: usage._replace(free=0))
    error = save_error(tmp_path, "checkpoint-4", RuntimeError("PytorchStreamWriter failed writing file"))
    assert "disk" in str(error) and "full" in str(error) and "checkpoint-2 is still the last complete" in str(error)


def _enospc_on_save(monkeypatch, failing_call: int):
    from transformers import Trainer

    original, calls = Trainer._save_checkpoint, {"n": 0}

    def save(self, model, trial):
        calls["n"] += 1
        if calls["n"] == failing_call:
            staged = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            staged.mkdir(parents=True, exist_ok=True)
            (staged / "model.safetensors").write_bytes(b"torn")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)


def test_full_disk_keeps_previous_checkpoint_and_says_which(tiny_recipe, write_recipe, cli, monkeypatch):
    recipe = tiny_recipe(train={"max_steps": 4, "eval_steps": 2, "save_total_limit": 2})
    with monkeypatch.context() as m:
        _enospc_on_save(m, failing_call=2)
        code, _, err = cli("train", write_recipe(recipe))
    run = Path(recipe["output_dir"])
    assert code == 2 and "Traceback" not in err, err
    assert "disk" in err and "full" in err and "checkpoint-2 is still the last complete checkpoint" in err
    assert last_checkpoint(run).name == "checkpoint-2"
    assert not (run / "checkpoints" / ".partial" / "checkpoint-4").exists()  # the torn save freed its space
    code, _, err = cli("train", write_recipe(recipe), "--resume")
    assert code == 0, err
    assert last_checkpoint(run).name == "checkpoint-4"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps fds to paths through /proc")
def test_checkpoint_is_fsynced_before_the_rename(tiny_recipe, write_recipe, cli, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def record_replace(src, dst, **kwargs):
        events.append(("replace", str(Path(src).resolve())))
        return replace(src, dst, **kwargs)

    recipe = tiny_recipe(train={"max_steps": 1, "eval_steps": 1})
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", record_fsync)
        m.setattr(os, "replace", record_replace)
        code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    checkpoints = (Path(recipe["output_dir"]) / "checkpoints").resolve()
    staging = checkpoints / ".partial" / "checkpoint-1"
    rename = events.index(("replace", str(staging)))
    synced = {path for kind, path in events[:rename] if kind == "fsync"}
    files = {
        str(staging / p.relative_to(checkpoints / "checkpoint-1")) for p in (checkpoints / "checkpoint-1").rglob("*")
    }
    assert files and files | {str(staging)} <= synced
    assert ("fsync", str(checkpoints)) in events[rename:]
