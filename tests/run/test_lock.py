"""One writer per run folder: a run holds the folder's lock (flock on `.visiontune-lock`, naming its pid and host),
a second run into the folder is refused in one sentence naming that pid, and nothing a dead run left blocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from visiontune.core.errors import RunDirError
from visiontune.run.folder import LOCK, lock_run_dir, prepare_run_dir, release_run_locks

# A second process that takes the run folder's lock as a run does, says so, and keeps it until it is killed.
HOLDER = (
    "import sys, time; from pathlib import Path; from visiontune.run.folder import lock_run_dir; "
    "lock_run_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def holder() -> Iterator:
    """holder(folder) -> the process holding `folder`'s lock; killed (not asked to stop) at the end."""
    procs: list[subprocess.Popen] = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def _release():
    yield
    release_run_locks()


def test_a_second_writer_is_refused_naming_the_pid(tmp_path, holder):
    run = tmp_path / "run"
    prepare_run_dir(run, overwrite=False, resume=False)
    release_run_locks()
    proc = holder(run)
    with pytest.raises(RunDirError, match=f"pid {proc.pid} on ") as info:
        prepare_run_dir(run, overwrite=True, resume=False)
    assert str(run) in str(info.value) and "\n" not in str(info.value)
    record = json.loads((run / LOCK).read_text())
    assert record["pid"] == proc.pid and record["host"]


def test_a_killed_holder_leaves_nothing_that_blocks(tmp_path, holder):
    run = tmp_path / "run"
    run.mkdir()
    proc = holder(run)
    os.kill(proc.pid, signal.SIGKILL)  # a crash: no cleanup runs
    proc.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == proc.pid  # the stale file is still there
    assert prepare_run_dir(run, overwrite=False, resume=False) is None
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()


def test_the_holding_process_may_take_its_own_lock_again(tmp_path, holder):
    run = tmp_path / "run"
    run.mkdir()
    lock_run_dir(run)
    lock_run_dir(run)  # e.g. the next stage of the same run
    release_run_locks()
    proc = holder(run)  # released: another process takes it
    with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
        lock_run_dir(run)


def test_resume_is_refused_while_another_run_writes(tmp_path, holder):
    run = tmp_path / "run"
    prepare_run_dir(run, overwrite=False, resume=False)
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    release_run_locks()
    proc = holder(run)
    with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
        prepare_run_dir(run, overwrite=False, resume=True)


def test_a_concurrent_train_gets_one_sentence_and_changes_nothing(tiny_recipe, write_recipe, cli, holder):
    recipe = tiny_recipe(train={"max_steps": 1})
    run = Path(recipe["output_dir"])
    run.mkdir()
    proc = holder(run)  # another `visiontune train` into the same folder, still running
    code, _, err = cli("train", write_recipe(recipe))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and f"pid {proc.pid}" in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in run.iterdir()) == [LOCK]
    proc.kill()
    proc.wait()
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP"])
def test_a_filesystem_without_locks_is_named_not_taken_for_a_holder(tmp_path, monkeypatch, code):
    # NFS without a lock manager, Lustre mounted without -o flock: flock fails, and nobody holds the folder
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(RunDirError) as err:
        lock_run_dir(tmp_path)
    assert str(err.value).startswith(f"Run folder {tmp_path} is on a filesystem without file locks (")
    assert "being written by" not in str(err.value)
