"""Checks that the process group is what the launcher promised (DESIGN.md traps), and the `--nproc` launcher."""

from __future__ import annotations

import os
import subprocess
import sys

from visiontune.core.errors import DistributedError


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_process_group(num_processes: int) -> None:
    """Refuse to train when the launcher started N processes but they are not one synchronised group of N."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ and os.environ.get("ACCELERATE_USE_CPU"):
        # accelerate's simple launcher sets MASTER_ADDR for num_processes > 1 but starts only one process on CPU.
        raise DistributedError(
            "`accelerate launch --cpu --num_processes N` started a single process, not N; launch with "
            "`visiontune train --nproc N` or `torchrun --nproc_per_node N -m visiontune train ...` instead."
        )
    expected = launched_world_size()
    actual = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if expected != num_processes or expected != actual:
        raise DistributedError(
            f"The launcher set WORLD_SIZE={expected} but training would run {num_processes} process(es) in a group "
            f"of {actual}: the ranks would not synchronise. On CPU launch with `visiontune train --nproc N` or "
            "`torchrun --nproc_per_node N -m visiontune train ...` (we set the CPU backend); do not use "
            "`accelerate launch --cpu`, which silently runs one process."
        )
    accelerate_n = os.environ.get("ACCELERATE_NUM_PROCESSES")
    if accelerate_n and int(accelerate_n) != actual:
        raise DistributedError(
            f"accelerate asked for {accelerate_n} processes but {actual} joined the group; "
            "on CPU use `visiontune train --nproc N` instead of `accelerate launch --cpu`."
        )


def relaunch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` ranks (gloo on CPU)."""
    env = dict(os.environ)
    try:
        import torch

        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
    except ImportError:
        pass
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "visiontune",
        *_without_nproc(argv),
    ]
    return subprocess.call(cmd, env=env)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            out.append(arg)
    return out
