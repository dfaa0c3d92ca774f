"""Run-folder lifecycle: never overwrite by accident, find the checkpoint to resume from, save checkpoints durably.

Every folder visiontune creates carries a marker file (`.visiontune-run`, a small JSON); `--overwrite` only ever
deletes a folder that has one, so pointing output_dir at a data folder, a parent of runs or `.` loses nothing."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

from visiontune import __version__
from visiontune.core.errors import RunDirError

CHECKPOINTS = "checkpoints"
MARKER = ".visiontune-run"
PARTIAL = ".partial"  # staging folder under checkpoints/ that VisiontuneTrainer._save_checkpoint writes into
RUN = "run"  # the marker kind of a training run folder; output folders use their command's name
# What a run writes before its first checkpoint. A folder holding only these (and no complete checkpoint) is a run
# that failed early: nothing in it is worth protecting, so it is cleared and reused without --overwrite.
EARLY = frozenset(
    {MARKER, "config.yaml", "data_report.json", "eval", "metrics.jsonl", "tb", "wandb", "ranks", CHECKPOINTS}
)
LOW_DISK = 16 * 2**20  # free bytes under which a failed write is put down to a full disk
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def prepare_run_dir(path: Path | str, overwrite: bool, resume: bool) -> Path | None:
    """Create (or reopen) the run folder; return the checkpoint to resume from (None for a fresh run)."""
    path = _run_path(path)
    if resume:
        return _reopen(path)
    if path.is_dir() and any(path.iterdir()):
        _clear(path, overwrite)
    _create(path, RUN)
    return None


def prepare_output_folder(path: Path | str, what: str) -> Path:
    """Create the folder a command (`what`, e.g. "merge --out") writes into; refuse one that holds anything but a
    previous output of the same command. Returns the path with `~` expanded."""
    path = _usable(path, what)
    if path.is_dir() and any(path.iterdir()) and marker_kind(path) != what:
        raise RunDirError(_not_ours(path, marker_kind(path), what, "pass a new or empty folder"))
    _create(path, what)
    return path


def last_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint. Partially written ones live under `.partial/` and are never picked."""
    return newest_checkpoint(Path(run_dir).expanduser() / CHECKPOINTS)


def newest_checkpoint(folder: Path) -> Path | None:
    """Newest `checkpoint-N` in `folder` that has its trainer_state.json (written last, so it marks completion)."""
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    found = [(s, p) for s, p in found if (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def marker_kind(folder: Path) -> str | None:
    """The kind recorded in `folder`'s marker ("run", "merge --out", ...); None if there is no readable marker."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def publish(staging: Path, final: Path) -> None:
    """Move a fully written checkpoint into place with one atomic rename, fsyncing its contents first (so the
    rename never publishes data still only in the page cache) and its parent after (so the rename survives)."""
    sync_tree(staging)
    if final.exists():
        shutil.rmtree(final)  # the same step saved again (e.g. the last step is also a save step)
    os.replace(staging, final)
    sync_dir(final.parent)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, children first: a rename is only as durable as what it names."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        sync_dir(Path(root))


def sync_dir(folder: Path) -> None:
    """fsync a folder so the entries created or renamed in it survive a power cut."""
    try:
        _fsync(str(folder))
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):  # some filesystems cannot sync a folder
            raise


def save_error(checkpoints: Path, name: str, err: BaseException) -> RunDirError | None:
    """The one-sentence error for a failed checkpoint save, or None when `err` is not about the disk (a bug that
    should keep its traceback). torch and safetensors report a full disk as RuntimeError, hence the free-space check."""
    full = getattr(err, "errno", None) == errno.ENOSPC or _free_bytes(checkpoints) < LOW_DISK
    if not full and not isinstance(err, OSError):
        return None
    last = newest_checkpoint(checkpoints)
    kept = f"{last} is still the last complete checkpoint" if last else "no checkpoint is complete yet"
    then = "continue with --resume" if last else "start the run again"
    cause = f"the disk holding {checkpoints} is full" if full else f"writing failed ({err})"
    return RunDirError(f"Saving {name} failed because {cause}; {kept}, so fix that and {then}.")


def _run_path(path: Path | str) -> Path:
    """`_usable`, plus: never the working folder or one holding it (a recipe, data or other runs live there)."""
    path = _usable(path, "output_dir")
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        raise RunDirError(
            f"output_dir {path} is the working folder or holds it, so it is left alone; set output_dir to a "
            "subfolder such as runs/NAME."
        )
    return path


def _usable(path: Path | str, what: str) -> Path:
    """Expand `~`; refuse an empty path, a symlink (deleting through it would hit its target) or a file."""
    if not str(path).strip():
        raise RunDirError(f"{what} is empty; set it to a folder such as runs/NAME.")
    path = Path(path).expanduser()
    if path.is_symlink():
        raise RunDirError(f"{what} {path} is a symbolic link; point it at a real folder ({path.resolve()}) instead.")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path} is a file, not a folder; set it to a new or empty folder.")
    return path


def _reopen(path: Path) -> Path:
    ckpt = last_checkpoint(path)
    if ckpt is None:
        raise RunDirError(
            f"--resume: {path} has no complete checkpoint yet; start it without --resume "
            "(add --overwrite to replace what is there)."
        )
    _remove(path / CHECKPOINTS / PARTIAL, path)  # torn saves of the interrupted run; never resumed from
    return ckpt


def _clear(path: Path, overwrite: bool) -> None:
    """Empty a non-empty run folder, or refuse: only our own runs are cleared, and a finished one needs --overwrite."""
    kind = marker_kind(path)
    if kind != RUN:
        raise RunDirError(_not_ours(path, kind, "output_dir", "set output_dir to a new or empty folder"))
    if _failed_early(path):
        for name in EARLY:
            _remove(path / name, path)
        return
    if not overwrite:
        raise RunDirError(
            f"Run folder {path} already exists; pass --resume to continue it, --overwrite to "
            "replace it, or set output_dir to a new folder."
        )
    nested = [p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink() and marker_kind(p) == RUN]
    if nested:
        raise RunDirError(
            f"--overwrite: {path} holds other runs ({', '.join(sorted(nested))}), so it is left alone; "
            "set output_dir to the run itself."
        )
    for child in path.iterdir():  # empty it rather than delete it: the folder may be someone's working folder
        _remove(child, path)


def _failed_early(path: Path) -> bool:
    return last_checkpoint(path) is None and all(p.name in EARLY for p in path.iterdir())


def _not_ours(path: Path, kind: str | None, what: str, fix: str) -> str:
    made = f"holds a visiontune `{kind}` output" if kind else "holds files and was not made by visiontune"
    return f"{what}: {path} {made} (no matching {MARKER} marker), so it is left alone; {fix}."


def _create(path: Path, kind: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker = {"visiontune": __version__, "kind": kind, "created": datetime.now(UTC).isoformat()}
        staged = path / f"{MARKER}.tmp"
        staged.write_text(json.dumps(marker) + "\n")
        os.replace(staged, path / MARKER)  # never a torn marker: a half-written one would disown the folder
    except OSError as err:
        raise RunDirError(
            f"Cannot create {path} ({err.strerror or err}); check that no file sits in its path and that it is "
            "writable."
        ) from None


def _remove(target: Path, owner: Path) -> None:
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    except OSError as err:
        raise RunDirError(f"Cannot clear {target} in {owner} ({err.strerror or err}); remove it by hand.") from None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return LOW_DISK  # cannot tell; do not blame the disk
