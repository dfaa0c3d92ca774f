"""`fsdp2_unsharded` (what `full_weights` does for FSDP2 runs): on two gloo ranks a `fully_shard` model's parameters
are DTensor shards; inside, every rank holds the whole, equal parameters and its `state_dict()` whole plain tensors
(what the exports and the rank record read; FSDP2's own state_dict returns shards even after `unshard()`), also when
shard_grad_op left them gathered after an evaluation forward, and after it the shards are back and train on. Slow
(a two-rank launch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

RANK = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from visiontune.run.trainer import fsdp2_unsharded

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
reshard = sys.argv[2] == "full_shard"
for layer in model:
    fully_shard(layer, reshard_after_forward=reshard)
fully_shard(model, reshard_after_forward=reshard)
model(torch.ones(2, 4)).sum().backward()
with torch.no_grad():
    model(torch.ones(2, 4))  # an evaluation: shard_grad_op keeps the parameters gathered after it
kinds = lambda: sorted({type(p).__name__ for p in model.parameters()})
before = kinds()
with fsdp2_unsharded(model):
    inside = kinds()
    shapes = [list(p.shape) for p in model.parameters()]
    total = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    state = {k: [type(v).__name__, list(v.shape)] for k, v in model.state_dict().items()}
after = kinds()
model(torch.ones(2, 4)).sum().backward()  # the shards train on
with open(sys.argv[1] + str(dist.get_rank()), "w") as f:
    json.dump({"before": before, "inside": inside, "after": after, "shapes": shapes, "total": total, "state": state}, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["full_shard", "shard_grad_op"])
def test_fsdp2_parameters_are_whole_inside_and_sharded_after(tmp_path, sharding):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path / "out"), sharding], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out{r}").read_text()) for r in (0, 1)]
    for r in ranks:
        gathered = sharding == "shard_grad_op"  # after the evaluation forward
        assert r["before"] == (["Parameter"] if gathered else ["DTensor"]), r
        assert r["after"] == ["DTensor"] and r["inside"] == ["Parameter"], r
        assert r["shapes"] == [[6, 4], [6], [2, 6], [2]]  # whole, not halves
        assert [v for v in r["state"].values()] == [["Tensor", s] for s in r["shapes"]], r["state"]
    assert ranks[0]["total"] == ranks[1]["total"]
