"""Run-folder lifecycle: never overwrite by accident, one writer per run folder, find the checkpoint to resume from,
save checkpoints durably.

Every folder visiontune creates carries a marker file (`.visiontune-run`, a small JSON) that also records the
top-level names the run writes; `--overwrite` removes only those, so a data folder, a user's notes, a run nested
inside or an input of the new run are never lost. A run holds the folder's lock file (`.visiontune-lock`) while it
writes, so a second run into the same folder is refused instead of interleaving with the first."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from visiontune import __version__
from visiontune.core.errors import RunDirError

CHECKPOINTS = "checkpoints"
MARKER = ".visiontune-run"
LOCK = ".visiontune-lock"  # holds the pid and host of the run writing the folder; locked with flock while it does
BOOKKEEPING = frozenset({MARKER, LOCK, f"{MARKER}.tmp"})  # never removed by --overwrite, never reported as kept
PARTIAL = ".partial"  # staging folder under checkpoints/ that VisiontuneTrainer._save_checkpoint writes into
RUN = "run"  # the marker kind of a training run folder; output folders use their command's name
# What a run writes before its first checkpoint. A run folder holding only these (and no complete checkpoint) is a
# run that failed early: nothing in it is worth protecting, so it is cleared and reused without --overwrite.
EARLY = frozenset({"config.yaml", "data_report.json", "eval", "metrics.jsonl", "tb", "wandb", "ranks", CHECKPOINTS})
# Every top-level name a training run writes, with those its follow-up commands write by default (`eval`'s
# eval/cli, `export`'s merged/ and llava/). A new run records the ones not yet in its folder as its own.
RUN_WRITES = EARLY | frozenset(
    {
        "model",
        "adapter",
        "llava",
        "merged",
        "wise_ft_model",
        "tasks",
        "stages",
        "plots",
        "summary.json",
        "report.md",
        "report.html",
    }
)
# Recipe keys that name where a run writes, not what it reads.
OUTPUT_KEYS = frozenset({"output_dir", "export_state_to"})
LOW_DISK = 16 * 2**20  # free bytes under which a failed write is put down to a full disk
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def prepare_run_dir(path: Path | str, overwrite: bool, resume: bool, inputs: Iterable[Path] = ()) -> Path | None:
    """Create (or reopen) the run folder; return the checkpoint to resume from (None for a fresh run).
    `open_run_dir` + `OpenedRun.begin` in one go, for callers with nothing to load in between."""
    opened = open_run_dir(path, overwrite, resume, inputs)
    opened.begin()
    return opened.checkpoint


@dataclass
class OpenedRun:
    """A run folder checked and locked for this process, not changed yet (except torn saves, when resuming).
    `begin` removes the previous run's files and marks the folder as the new run's: the runner calls it only once
    the new run's data and model are loaded, so a start that fails leaves the previous run as it was."""

    path: Path
    checkpoint: Path | None = None  # where a resumed run continues from
    remove: list[Path] = field(default_factory=list)
    fresh: bool = True  # a new run: it gets a new marker (a resumed one keeps its own)

    def begin(self) -> None:
        for target in self.remove:
            _remove(target, self.path)
        if self.fresh:
            present = {p.name for p in self.path.iterdir()} - BOOKKEEPING
            _create(self.path, RUN, writes=RUN_WRITES - present)
            if present:
                print(_kept_note(self.path, present), file=sys.stderr)


def open_run_dir(path: Path | str, overwrite: bool, resume: bool, inputs: Iterable[Path] = ()) -> OpenedRun:
    """Check the run folder and take its lock; plan what `begin` removes. `inputs`: paths the new run reads."""
    path = _run_path(path)
    if resume:
        checkpoint = _resume_checkpoint(path)
        lock_run_dir(path)
        _remove(path / CHECKPOINTS / PARTIAL, path)  # torn saves of the interrupted run; never resumed from
        return OpenedRun(path, checkpoint, fresh=False)
    _refuse_foreign(path)  # before the lock: no lock file is written into a folder that is not a run's
    _make(path)
    lock_run_dir(path)
    existing = _refuse_foreign(path)  # again under the lock: another run may have ended in between
    return OpenedRun(path, remove=_previous_files(path, overwrite, list(inputs)) if existing else [])


def refuse_resume_with_overwrite(resume: bool, overwrite: bool) -> None:
    """The pair contradicts itself (continue the run / replace it); neither may silently win."""
    if resume and overwrite:
        raise RunDirError(
            "--resume continues the run in output_dir and --overwrite replaces it, so pass only one of them."
        )


def resume_wanted(flag: bool, recipe_key: bool, overwrite: bool) -> bool:
    """Whether a recipe's `train.resume: true` applies. --overwrite on the command line outranks it (said in one
    line); --resume with --overwrite is refused."""
    refuse_resume_with_overwrite(flag, overwrite)
    if recipe_key and overwrite and os.environ.get("RANK", "0") == "0":
        print("--overwrite starts the run afresh, so the recipe's train.resume: true does not apply.", file=sys.stderr)
    return recipe_key and not overwrite


def recipe_paths(recipe: dict) -> list[Path]:
    """Every existing path a recipe (as a dict) reads: model, data, init_from ... (the keys that name outputs
    excluded). Relative paths are taken from the working folder, as the loaders take them."""
    return [Path(text).expanduser() for text in _strings(recipe) if _exists(text)]


def prepare_output_folder(path: Path | str, what: str, inputs: Iterable[object] = ()) -> Path:
    """Create the folder a command (`what`, e.g. "merge --out") writes into; refuse one that is or holds one of the
    command's `inputs`, or holds anything but a previous output of the same command. Returns `path`, `~` expanded."""
    path = _usable(path, what)
    refuse_input_as_output(path, inputs, what)
    if path.is_dir() and any(path.iterdir()) and marker_kind(path) != what:
        raise RunDirError(_not_ours(path, marker_kind(path), what, "pass a new or empty folder"))
    _create(path, what)
    return path


def check_output_file(path: Path | str, what: str, inputs: Iterable[object] = ()) -> Path:
    """The folder rules for a command that writes one file (`what`, e.g. "convert --out"): refuse an input, and an
    existing file unless the same command wrote it (it then left a hidden `.NAME.visiontune-run` beside it, see
    `mark_output_file`). Returns `path`, `~` expanded."""
    path = Path(path).expanduser()
    refuse_input_as_output(path, inputs, what)
    if path.is_dir() and not path.is_symlink():
        raise RunDirError(f"{what} {path} is a folder; give the path of the file to write.")
    if os.path.lexists(path) and _kind(_file_marker(path)) != what:
        raise RunDirError(
            f"{what}: {path} exists and was not written by `visiontune {what.split()[0]}`, so it is left alone; "
            "pass a new file name."
        )
    return path


def mark_output_file(path: Path, what: str) -> None:
    """Record that `what` wrote `path`, so that running it again may replace the file."""
    marker = {"visiontune": __version__, "kind": what, "created": datetime.now(UTC).isoformat()}
    _file_marker(path).write_text(json.dumps(marker) + "\n")


def refuse_input_as_output(out: Path | str, inputs: Iterable[object], what: str) -> None:
    """An output never replaces what its command reads: refuse one that is an input or holds one. `inputs` may
    hold anything a command takes (hub ids, `builtin:` names, None); only existing paths count."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        if not isinstance(given, str | Path) or not _exists(str(given)):
            continue
        source = Path(given).expanduser().resolve()
        if source == target or target in source.parents:
            relation = "is also an input" if source == target else f"holds {given}, an input"
            raise RunDirError(
                f"{what}: {out} {relation} of this command, which writing there would replace; pass another "
                f"{what.split()[-1]}."
            )


# ---- one writer per run folder

_HELD: dict[Path, int] = {}  # run folder -> open descriptor of its lock file, for the locks this process holds


def lock_run_dir(path: Path) -> None:
    """Hold `path`'s lock until `release_run_locks` or the end of the process, or refuse in one sentence naming the
    holder. flock belongs to the open file, so the kernel drops it when its holder dies however it dies: a lock file
    left by a crashed run never blocks. Taken by rank 0 only; the other ranks of a launch write under its lock."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one writer per folder is then up to the user
        return
    key = path.resolve()
    held = _HELD.get(key)
    if held is not None and _same_file(held, key / LOCK):
        return  # this process (e.g. a second stage of the same run) holds it already
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no locks on this filesystem, not "held"
            os.close(fd)
            raise RunDirError(
                f"Run folder {path} is on a filesystem without file locks ({os.strerror(err.errno)}), so visiontune "
                "cannot keep a second run out of it; mount it with locking (Lustre: -o flock) or set output_dir on a "
                "filesystem that has locks."
            ) from None
        holder = _holder(fd)
        os.close(fd)
        raise RunDirError(
            f"Run folder {path} is being written by {holder}; wait for that run to end (or stop it) or set "
            "output_dir to another folder."
        ) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(UTC).isoformat()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[key] = fd


def release_run_locks() -> None:
    """Let go of every run-folder lock this process holds (its runs are over)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False  # the folder was removed and made again: its lock file is a new one


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the file (it writes just after locking: wait a moment)."""
    for _ in range(20):
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            record = None
        if isinstance(record, dict) and "pid" in record:
            return f"visiontune pid {record['pid']} on {record.get('host', 'an unknown host')}"
        time.sleep(0.05)
    return "another visiontune process"


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
    return _kind(folder / MARKER)


def _kind(marker: Path) -> str | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def _file_marker(path: Path) -> Path:
    return path.with_name(f".{path.name}{MARKER}")


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


def _resume_checkpoint(path: Path) -> Path:
    ckpt = last_checkpoint(path)
    if ckpt is None:
        raise RunDirError(
            f"--resume: {path} has no complete checkpoint yet; start it without --resume "
            "(add --overwrite to replace what is there)."
        )
    return ckpt


def _entries(path: Path) -> list[Path]:
    """What a folder holds besides its lock file (a run that failed before marking its folder leaves only that)."""
    return [p for p in path.iterdir() if p.name != LOCK] if path.is_dir() else []


def _refuse_foreign(path: Path) -> list[Path]:
    """What the folder holds (its lock file aside); refused unless that is nothing or a visiontune run."""
    existing = _entries(path)
    if existing and marker_kind(path) != RUN:
        raise RunDirError(_not_ours(path, marker_kind(path), "output_dir", "set output_dir to a new or empty folder"))
    return existing


def _previous_files(path: Path, overwrite: bool, inputs: list[Path]) -> list[Path]:
    """The previous run's own files that a new run removes, or a refusal: a run that got as far as a checkpoint
    or a model needs --overwrite, and an input of the new run must not be among them."""
    theirs = [p for p in path.iterdir() if p.name in _recorded(path)]
    if not overwrite and not _failed_early(path, theirs):
        raise RunDirError(
            f"Run folder {path} already exists; pass --resume to continue it, --overwrite to "
            "replace it, or set output_dir to a new folder."
        )
    _refuse_inputs_among(path, theirs, inputs)
    # A symlink may have been put there by hand, and a folder now holding another visiontune output is no longer
    # only the previous run's: both are left in place (and said).
    return [p for p in theirs if not p.is_symlink() and not _holds_marker(p)]


def _recorded(path: Path) -> frozenset[str]:
    """The top-level names the folder's run recorded writing; a marker from before records existed: RUN_WRITES."""
    try:
        writes = json.loads((path / MARKER).read_text()).get("writes")
    except (OSError, ValueError, AttributeError):
        writes = None
    return frozenset(writes) if isinstance(writes, list) else RUN_WRITES


def _failed_early(path: Path, theirs: list[Path]) -> bool:
    """No checkpoint and nothing but what a run writes before its first one: nothing worth protecting."""
    return last_checkpoint(path) is None and all(p.name in EARLY for p in theirs)


def _refuse_inputs_among(path: Path, theirs: list[Path], inputs: list[Path]) -> None:
    for given in inputs:
        for form in (Path(os.path.abspath(given)), given.resolve()):  # the path as named, and where it leads
            where = _overlap(path, theirs, form)
            if where:
                raise RunDirError(
                    f"{given} is an input of this run and {where}; a new run in {path} replaces the previous run's "
                    f"files, so move the input out of {path} or use a new output_dir."
                )


def _overlap(path: Path, theirs: list[Path], form: Path) -> str | None:
    """How an input path meets the previous run's files, in words; None when it does not."""
    if form == path.resolve():
        return "is the run folder itself"
    for entry in theirs:
        if form == entry.resolve():
            return "was written there by the previous run"
        if entry.resolve() in form.parents:
            return f"lies in {entry}, which the previous run wrote"
    return None


def _holds_marker(folder: Path) -> bool:
    """Whether a (non-symlink) folder holds another visiontune output's marker anywhere below it."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    return any(MARKER in files for _root, _dirs, files in os.walk(folder))  # os.walk never follows symlinks


def _kept_note(path: Path, kept: set[str]) -> str:
    names = sorted(kept)
    listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"Left in {path} what the previous run did not write (or what holds other outputs): {listed}."


def _strings(value: object, key: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for name, item in value.items():
            if name not in OUTPUT_KEYS:
                yield from _strings(item, name)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item, key)
    elif isinstance(value, str) and value.strip() and "\n" not in value:
        yield value


def _exists(text: str) -> bool:
    try:
        return os.path.lexists(Path(text).expanduser())
    except (OSError, ValueError):
        return False


def _not_ours(path: Path, kind: str | None, what: str, fix: str) -> str:
    made = f"holds a visiontune `{kind}` output" if kind else "holds files and was not made by visiontune"
    return f"{what}: {path} {made} (no matching {MARKER} marker), so it is left alone; {fix}."


def _make(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"Cannot create {path} ({err.strerror or err}); check that no file sits in its path and that it is "
            "writable."
        ) from None


def _create(path: Path, kind: str, writes: Iterable[str] | None = None) -> None:
    _make(path)
    marker = {"visiontune": __version__, "kind": kind, "created": datetime.now(UTC).isoformat()}
    if writes is not None:
        marker["writes"] = sorted(writes)  # the names a later --overwrite may remove: what this run writes
    try:
        staged = path / f"{MARKER}.tmp"
        staged.write_text(json.dumps(marker) + "\n")
        os.replace(staged, path / MARKER)  # never a torn marker: a half-written one would disown the folder
    except OSError as err:
        raise RunDirError(
            f"Cannot write {path / MARKER} ({err.strerror or err}); check that {path} is writable."
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
