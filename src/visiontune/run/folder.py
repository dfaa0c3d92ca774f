"""Run-folder lifecycle: never overwrite by accident, find the checkpoint to resume from."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from visiontune.core.errors import RunDirError

CHECKPOINTS = "checkpoints"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def prepare_run_dir(path: Path, overwrite: bool, resume: bool) -> Path | None:
    """Create `path`; return the checkpoint to resume from (None for a fresh run)."""
    if resume:
        ckpt = last_checkpoint(path)
        if ckpt is None:
            raise RunDirError(
                f"--resume: {path} has no complete checkpoint yet; start it without --resume "
                "(add --overwrite to replace what is there)."
            )
        return ckpt
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"Run folder {path} already exists; pass --resume to continue it, --overwrite to "
                "replace it, or set output_dir to a new folder."
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return None


def last_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint. Partially written ones live under `.partial/` and are never picked."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    found = [(s, p) for s, p in found if (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None
