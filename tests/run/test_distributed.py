"""Two real gloo ranks on CPU: both take part and end with identical weights; the launch traps are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

from visiontune.run.distributed import _without_nproc


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _check_ranks(run: Path, train_size: int, epochs: int) -> None:
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # Each rank trains on its own half of every epoch (the sampler pads to whole, even batches).
    half = -(-train_size // 2) * epochs
    assert all(half <= r["samples_seen"] <= half + 4 * epochs for r in ranks), ranks
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "ranks ended with different weights"


def test_nproc_2_runs_two_synchronised_ranks(tiny_recipe, write_recipe):
    # Gradual unfreezing under DDP takes the gradient-masking path (the DDP reducer's parameter set is fixed).
    schedule = [{"epoch": 0, "blocks": 0}, {"epoch": 1, "blocks": "all"}]
    recipe = tiny_recipe(
        train={"epochs": 2, "batch_size": 4}, tune={"method": "gradual_unfreeze", "unfreeze": schedule}
    )
    path = write_recipe(recipe)
    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "train", str(path), "--nproc", "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_ranks(Path(recipe["output_dir"]), train_size=27, epochs=2)
    assert (Path(recipe["output_dir"]) / "report.md").is_file()


def test_nproc_2_lora_ranks_stay_in_step(tiny_recipe, write_recipe, fixtures_dir):
    # LoRA wraps the model in PEFT before DDP sees it; both ranks must train the same adapters and export once.
    recipe = tiny_recipe(
        model=str(fixtures_dir / "hf-vit"), train={"epochs": 1, "batch_size": 4}, tune={"method": "lora"}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "train", str(write_recipe(recipe)), "--nproc", "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(recipe["output_dir"])
    _check_ranks(run, train_size=27, epochs=1)
    assert (run / "model").is_dir() and (run / "report.md").is_file()


def test_plain_torchrun_without_cpu_flag_still_synchronises(tiny_recipe, write_recipe):
    """Known launcher trap: torchrun without a CPU flag used to give two unsynchronised processes."""
    recipe = tiny_recipe(train={"epochs": 1, "batch_size": 4})
    path = write_recipe(recipe)
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "visiontune",
            "train",
            str(path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_ranks(Path(recipe["output_dir"]), train_size=27, epochs=1)


def test_mismatched_group_is_refused(monkeypatch):
    from visiontune.core.errors import DistributedError
    from visiontune.run.distributed import check_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        check_process_group(1)
    except DistributedError as err:
        assert "WORLD_SIZE=2" in str(err) and "--nproc" in str(err)
    else:
        raise AssertionError("a 1-process group under WORLD_SIZE=2 was accepted")


def test_nproc_flag_is_stripped_for_the_ranks():
    assert _without_nproc(["train", "r.yaml", "--nproc", "2", "train.lr=1"]) == ["train", "r.yaml", "train.lr=1"]
    assert _without_nproc(["train", "--nproc=4", "r.yaml"]) == ["train", "r.yaml"]


def test_accelerate_cpu_single_process_trap_is_refused(monkeypatch):
    from visiontune.core.errors import DistributedError
    from visiontune.run.distributed import check_process_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` leaves behind
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    try:
        check_process_group(1)
    except DistributedError as err:
        assert "single process" in str(err)
    else:
        raise AssertionError("accelerate's silent single-process launch was accepted")


def test_check_launch_environment_needs_no_process_group(monkeypatch):
    from visiontune.core.errors import DistributedError
    from visiontune.run.distributed import check_launch_environment

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    try:
        check_launch_environment()
    except DistributedError as err:
        assert "single process" in str(err) and "--nproc" in str(err)
    else:
        raise AssertionError("accelerate's silent single-process launch was accepted")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / our --nproc: a real group
    check_launch_environment()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    check_launch_environment()


def _run_ranks(worker: Path, *args: str, **popen) -> subprocess.Popen:
    """`run_ranks(2, [worker, *args])` in a subprocess, as `visiontune train --nproc 2` runs it."""
    code = "import sys; from visiontune.run.distributed import run_ranks; sys.exit(run_ranks(2, sys.argv[1:]))"
    env = {k: v for k, v in _env().items() if k not in ("VISIONTUNE_DEBUG", "VISIONTUNE_ERROR_DIR")}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(worker), *args], env=env, stderr=subprocess.PIPE, text=True, **popen
    )


def test_a_rank_error_is_printed_once_without_the_launcher_traceback(tmp_path):
    worker = tmp_path / "worker.py"  # both ranks stop on the same user error, as a bad recipe would
    worker.write_text(
        "import sys\nsys.argv = ['visiontune', 'eval', 'run', '--data', 'd', '--task', 'nope']\n"
        "from visiontune.cli import main\nmain()\n"
    )
    proc = _run_ranks(worker)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: `nope` is not a known task"), err
    assert "Traceback" not in err and "ChildFailedError" not in err


def test_a_rank_that_dies_without_a_sentence_is_named(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, time\n"
        "if os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(60)\n"
    )
    proc = _run_ranks(worker)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "error: rank 1 was killed by SIGKILL" in err and "Traceback" not in err


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has stopped; only its exit status is left for a parent to collect


def test_ctrl_c_stops_every_rank_and_exits_130(tmp_path):
    import signal
    import time

    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, pathlib, sys, time\n"
        f"pathlib.Path({str(tmp_path)!r}, 'pid' + os.environ['RANK']).write_text(str(os.getpid()))\n"
        "try:\n    time.sleep(300)\nexcept KeyboardInterrupt:\n    sys.exit(130)\n"  # as `visiontune train` does
    )
    proc = _run_ranks(worker)
    pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
    deadline = time.monotonic() + 240
    while not all(p.is_file() and p.read_text() for p in pid_files):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    ranks = [int(p.read_text()) for p in pid_files]
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends to the foreground process
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 10
    while any(map(_alive, ranks)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, ranks)), "a rank outlived Ctrl-C"
    assert "Traceback" not in err


def test_a_user_error_under_nproc_is_one_sentence(tiny_recipe, write_recipe, tmp_path):
    missing = tmp_path / "no-such-images"
    path = write_recipe(tiny_recipe(data={"train": str(missing)}))
    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "train", str(path), "--nproc", "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
