"""Ranks on different machines each look for the newest checkpoint in output_dir; on node-local disks they find
different ones (or none) and would train from different states. Once the process group exists, the ranks compare
what they found and refuse in one sentence naming the ranks and hosts (docs/multi-node.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from visiontune.core.errors import DistributedError
from visiontune.run import distributed


def _group(monkeypatch, found_by_rank: list[tuple[str | None, str]]) -> None:
    """A stand-in process group whose ranks report `found_by_rank` (checkpoint name, host)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: len(found_by_rank))

    def all_gather_object(out: list, mine) -> None:
        assert mine[0] == found_by_rank[0][0]  # this process is rank 0
        out[:] = found_by_rank

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)


def test_ranks_that_find_other_checkpoints_are_refused(monkeypatch):
    _group(monkeypatch, [("checkpoint-40", "node0"), ("checkpoint-40", "node0"), (None, "node1")])
    with pytest.raises(DistributedError) as err:
        distributed.check_same_checkpoint(Path("/runs/a/checkpoints/checkpoint-40"))
    assert str(err.value) == (
        "rank 0 on node0 resumes from checkpoint-40 but rank 2 on node1 finds none in output_dir: the run folder "
        "must be on a filesystem every node shares, at the same path (docs/multi-node.md)."
    )


def test_ranks_that_agree_go_on(monkeypatch):
    _group(monkeypatch, [("checkpoint-40", "node0"), ("checkpoint-40", "node1")])
    distributed.check_same_checkpoint(Path("/runs/a/checkpoints/checkpoint-40"))
    _group(monkeypatch, [(None, "node0"), (None, "node1")])
    distributed.check_same_checkpoint(None)  # a fresh run on every rank


def test_one_process_has_nothing_to_compare():
    assert not dist.is_initialized()
    distributed.check_same_checkpoint(None)
