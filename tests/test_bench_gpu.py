"""benchmarks/bench_gpu.py is ready to run on a GPU: off one it refuses in one sentence, and its `--smoke` mode runs
every side (visiontune LoRA / full, padded and packed; TRL SFTTrainer) on a tiny config on CPU and prints the table
and the BENCHMARKS.md block (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)


def test_refuses_without_a_gpu(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py"])
    assert bench.main() == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: bench_gpu.py measures a GPU and none is visible here; run it on a GPU machine, or pass --smoke to "
        "check on CPU that it runs."
    ]


@pytest.mark.slow
def test_smoke_runs_every_side():
    proc = _run("--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    block = proc.stdout.split("<!-- markdown for BENCHMARKS.md -->")[1]
    rows = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    sides = ["vt_lora", "vt_lora_packed", "trl_lora", "vt_full", "vt_full_packed", "trl_full"]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == sides
    for row in rows:
        tps = float(row.split(" | ")[1])
        assert tps > 0, row
    assert "| trl_lora | " in block and "1.00x" in block
