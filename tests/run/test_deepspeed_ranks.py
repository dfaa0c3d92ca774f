"""DeepSpeed ZeRO-2 for real: two CPU ranks (gloo) train classify with `train.deepspeed: zero2`, finite losses,
identical weights on both ranks, one export. Slow (DeepSpeed builds its CPU ops on a first run) and needs the
`deepspeed` extra."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")


@pytest.mark.slow
def test_zero2_two_cpu_ranks_train_classify(tiny_recipe, write_recipe):
    recipe = tiny_recipe(train={"epochs": 1, "batch_size": 4, "deepspeed": "zero2"})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "train", str(write_recipe(recipe)), "--nproc", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(recipe["output_dir"])
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["samples_seen"] > 0 for r in ranks), ranks
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "ranks ended with different weights"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), rows
    assert (run / "model").is_dir() and (run / "report.md").is_file()
