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


def test_plain_torchrun_without_cpu_flag_still_synchronises(tiny_recipe, write_recipe):
    """DESIGN.md trap: torchrun without a CPU flag used to give two unsynchronised processes."""
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
