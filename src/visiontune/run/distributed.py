"""Checks that the process group is what the launcher promised (known launcher traps), and the `--nproc` launcher."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from visiontune.core.errors import DistributedError

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

# Set by `run_ranks` for its ranks: a rank that stops on an error writes its one sentence to DIR/rank{RANK}.txt
# instead of printing it, so the launcher prints it once (and never torchrun's ChildFailedError report).
ERROR_DIR = "VISIONTUNE_ERROR_DIR"
INTERRUPTED = 130  # the shell's exit status for Ctrl-C


def launched_world_size() -> int:
    """How many ranks the launcher started (1 when run without one): the one reader of WORLD_SIZE's value."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_launch_environment() -> None:
    """The launch traps the environment alone shows; needs no process group, so a run calls it before it creates
    anything."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
    if "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ and use_cpu:
        # accelerate's simple launcher sets MASTER_ADDR for num_processes > 1 but starts only one process on CPU.
        raise DistributedError(
            "`accelerate launch --cpu --num_processes N` started a single process, not N; launch with "
            "`visiontune train --nproc N` or `torchrun --nproc_per_node N -m visiontune train ...` instead."
        )


def check_process_group(num_processes: int) -> None:
    """Refuse to train when the launcher started N processes but they are not one synchronised group of N."""
    import torch.distributed as dist

    check_launch_environment()
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


def check_same_checkpoint(checkpoint: Path | None) -> None:
    """Every rank must resume from the same checkpoint. Each looks for the newest one in output_dir on its own
    machine; on node-local disks (docs/multi-node.md) they would find different ones, or none, and train from
    different states. Collective: call it on every rank once the process group exists."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (checkpoint.name if checkpoint else None, socket.gethostname()))
    first = seen[0]
    other = next((rank for rank, found in enumerate(seen) if found[0] != first[0]), None)
    if other is not None:
        raise DistributedError(
            f"rank 0 on {first[1]} resumes from {first[0] or 'no checkpoint'} but rank {other} on {seen[other][1]} "
            f"finds {seen[other][0] or 'none'} in output_dir: the run folder must be on a filesystem every node "
            "shares, at the same path (docs/multi-node.md)."
        )


def relaunch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` ranks (gloo on CPU); returns the exit status."""
    return run_ranks(nproc, ["-m", "visiontune", *_without_nproc(argv)])


def run_ranks(nproc: int, program: list[str]) -> int:
    """torchrun `program` with `nproc` ranks, in this process so that its outcome becomes an exit status: 0, 2 with
    the failing rank's sentence printed once, or 130 after Ctrl-C has stopped every rank."""
    errors = Path(tempfile.mkdtemp(prefix="visiontune-ranks-"))
    os.environ[ERROR_DIR] = str(errors)  # the ranks inherit this process's environment
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
        return _launch(nproc, program, errors)
    except KeyboardInterrupt:  # Ctrl-C before the launcher took over its signals: no rank has started yet
        return INTERRUPTED
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _launch(nproc: int, program: list[str], errors: Path) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not os.environ.get("VISIONTUNE_DEBUG"):
        logging.disable(logging.CRITICAL)  # the launcher's banners and failure log; --debug keeps them
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", *program]))
    except (SignalException, KeyboardInterrupt):
        # The launcher has already passed the signal on to every rank (each runs in its own session, so a
        # terminal's Ctrl-C reaches only this process) and waited for them to stop.
        return INTERRUPTED
    except ChildFailedError as err:
        print(f"error: {_failure(err, errors)}", file=sys.stderr)
        return 2
    finally:
        logging.disable(logging.NOTSET)
    return 0


def _failure(err: ChildFailedError, errors: Path) -> str:
    """The first rank's own error sentence, else what the launcher knows about the rank that died."""
    written = sorted(errors.glob("rank*.txt"), key=lambda p: int(p.stem.removeprefix("rank") or 0))
    if written:
        return written[0].read_text().strip()
    # The launcher stops the other ranks with SIGTERM once one fails: those are not the cause.
    stopped = (-signal.SIGTERM, -signal.SIGINT)
    rank, failure = min(err.failures.items(), key=lambda item: (item[1].exitcode in stopped, item[0]))
    code = failure.exitcode
    how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
    hint = " (often: out of memory)" if code == -signal.SIGKILL else ""
    return f"rank {rank} {how}{hint}; run again with --debug to see the launcher's report."


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def write_rank_error(message: str) -> bool:
    """Under `run_ranks`, leave this rank's error sentence for the launcher to print; False when not under it."""
    folder = os.environ.get(ERROR_DIR)
    if not folder or "RANK" not in os.environ or not Path(folder).is_dir():
        return False
    (Path(folder) / f"rank{os.environ['RANK']}.txt").write_text(message + "\n")
    return True


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
