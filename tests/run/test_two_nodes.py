"""Two "nodes" on this machine: two torchrun launches, one rank each, meeting through a shared c10d rendezvous on
127.0.0.1 (`--nnodes 2`), as docs/multi-node.md tells users to start visiontune on several machines. The run must
finish on both, as one group of two gloo ranks, with the same weights on both. Slow (two launches)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_share_one_run(tiny_recipe, write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe(train={"epochs": 1, "batch_size": 4}))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "VISIONTUNE_ERROR_DIR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    port = _free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    node += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes"]
    node += ["-m", "visiontune", "train", str(recipe)]
    logs = [open(tmp_path / f"node{i}.log", "w") for i in (0, 1)]  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen(node, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path) for log in logs]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"node{i}.log").read_text()[-2000:] for i in (0, 1))
    assert codes == [0, 0], output
    run = tmp_path / "run"
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["samples_seen"] > 0 for r in ranks), ranks
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "the two nodes ended with different weights"
    assert (run / "model").is_dir() and (run / "summary.json").is_file()
    assert output.count("Run folder:") == 1  # rank 0 reports; the other node's rank does not
