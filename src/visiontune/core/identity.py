"""When two records hold "the same image", and what follows from it: splits that never separate copies of one image,
a refusal when validation shares images with training, duplicate counts, and a fingerprint of the data for resume.

"The same image" means byte-identical image content: the same resolved file, a copy of it under another name, or
equal encoded bytes / pixel arrays in memory. A re-encoded or resized copy is a different image here (finding those
needs perceptual hashing, which costs a decode per image). Files are not all hashed: only files whose byte size
equals another file's can be identical, so a file with a unique size keeps its path as its key and only same-size
files are read and hashed. Measured on 5,000 generated 500x375 JPEGs of ~57 KB (page cache warm, 2 shared cores):
sizing them all 0.01 s; hashing all of them 0.65 s; `image_keys` 0.9 s (98 % shared a size with another, so were
hashed); the decode check every run already does, ~4 s.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.core.errors import DataError

Key = str  # equal keys <=> the same image (see the module docstring)
LISTED = 3  # shared images a refusal names


def file_digest(path: str | Path) -> str:
    """blake2b-128 of a file's bytes (~1 GB/s on one core; hashlib releases the GIL, so threads overlap)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def memory_digest(value: Any) -> str:
    """Encoded image bytes, a pixel array or a PIL image, hashed with what makes it that image (shape, mode)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return hashlib.blake2b(bytes(value), digest_size=16).hexdigest()
    if isinstance(value, np.ndarray):
        head = f"{value.dtype}:{value.shape}:".encode()
        return hashlib.blake2b(head + np.ascontiguousarray(value).tobytes(), digest_size=16).hexdigest()
    head = f"pil:{value.mode}:{value.size}:".encode()  # a decoded PIL image
    return hashlib.blake2b(head + value.tobytes(), digest_size=16).hexdigest()


def image_keys(sources: Sequence[Any], workers: int = 8) -> list[Key]:
    """One key per source (a file path, bytes, a pixel array, a PIL image, or None for no image): equal keys mean
    the same image. Keys are comparable only within one call, so give every split of a data set at once."""
    resolved = {s: Path(s).resolve() for s in sources if isinstance(s, str | Path)}
    file_keys = _file_keys(list(dict.fromkeys(resolved.values())), workers)
    keys = []
    for i, source in enumerate(sources):
        if source is None:
            keys.append(f"none:{i}")  # no image: never the same as another record
        elif isinstance(source, str | Path):
            keys.append(file_keys[resolved[source]])
        else:
            keys.append("data:" + memory_digest(source))
    return keys


def _file_keys(files: list[Path], workers: int) -> dict[Path, Key]:
    """Hash only files whose size another file shares; a file that cannot be read keys by its path (the bad-sample
    check names it)."""
    sizes = {path: _size(path) for path in files}
    counts = Counter(size for size in sizes.values() if size is not None)
    to_hash = [path for path, size in sizes.items() if size is not None and counts[size] > 1]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = dict(zip(to_hash, pool.map(_digest_or_none, to_hash), strict=True))
    return {path: f"data:{digests[path]}" if digests.get(path) else f"file:{path}" for path in files}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _digest_or_none(path: Path) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None


def identify_sets(sets: Sequence[Any], sources: Callable[[Any], list]) -> list[list[Key]]:
    """Each record set's image keys, computed over all `sets` at once so that they compare across sets, and kept on
    the sets (their `keys` attribute, which their `subset` carries) so that a split does not hash twice.
    `sources(set)` lists a set's images as `image_keys` takes them."""
    if any(s.keys is None for s in sets):
        keys = image_keys([source for s in sets for source in sources(s)])
        for s in sets:
            s.keys, keys = keys[: len(s)], keys[len(s) :]
    return [list(s.keys or []) for s in sets]


# ------------------------------------------------------------------------------------------------- what follows


def groups(keys: Sequence[Hashable]) -> list[list[int]]:
    """Record indices grouped by key, groups in order of their first record."""
    found: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        found.setdefault(key, []).append(i)
    return list(found.values())


def duplicates(keys: Sequence[Hashable]) -> int:
    """Records that repeat an earlier record of the same split."""
    return len(keys) - len(set(keys))


def refuse_shared(
    train_keys: Sequence[Key | tuple[Key, ...]],
    val_keys: Sequence[Key | tuple[Key, ...]],
    train_ref: Callable[[int], str],
    val_ref: Callable[[int], str],
    what: str = "an image",
) -> None:
    """One sentence when a validation record shares `what` with a training record (a record may have several keys:
    a conversation's images): a score on what the model trained on measures memory, not generalisation."""
    first_train: dict[Key, int] = {}
    for i, keys in enumerate(train_keys):
        for key in _several(keys):
            first_train.setdefault(key, i)
    shared = []
    for i, keys in enumerate(val_keys):
        match = next((first_train[key] for key in _several(keys) if key in first_train), None)
        if match is not None:
            shared.append((i, match))
    if not shared:
        return
    named = "; ".join(_pair(val_ref(v), train_ref(t)) for v, t in shared[:LISTED])
    more = f"; ... and {len(shared) - LISTED} more" if len(shared) > LISTED else ""
    raise DataError(
        f"{len(shared)} of {len(val_keys)} validation records have {what} that is also in the training data "
        f"(same content): {named}{more}; remove them from data.val or data.train, or leave data.val out so that "
        "data.val_split keeps every copy of an image on one side."
    )


def _pair(val: str, train: str) -> str:
    """ "VAL = TRAIN" for a copy; a file listed in both splits is named once."""
    return val if val == train else f"{val} = {train}"


def _several(keys: Key | tuple[Key, ...]) -> tuple[Key, ...]:
    return keys if isinstance(keys, tuple) else (keys,)


def fingerprint(splits: dict[str, tuple[Sequence[Key], Sequence[Any]]], classes: Sequence[str] | None) -> dict:
    """What a resumed run must find unchanged: the class list, each split's size and a digest of its records
    (image keys and labels/texts, in order)."""
    h = hashlib.blake2b(digest_size=16)
    for role, (keys, labels) in splits.items():
        h.update(json.dumps([role, list(keys), list(labels)], default=str).encode())
    record: dict[str, Any] = {role: len(keys) for role, (keys, _) in splits.items()}
    if classes is not None:
        record["classes"] = list(classes)
    return {**record, "digest": h.hexdigest()}


def check_resume_data(report: Path, now: dict) -> None:
    """Refuse to resume on data other than the run's (its `report`, data_report.json, holds the fingerprint it
    started with): new classes fail while loading the checkpoint, new images shift every epoch's batches. Runs
    before anything is written, so the run folder stays as it was. A run from before fingerprints is not checked."""
    try:
        saved = json.loads(report.read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return
    current = now.get("data")
    if not isinstance(saved, dict) or current is None or saved == current:
        return
    raise DataError(
        f"--resume: the data changed since the run started ({_difference(saved, current)}; the run's record is "
        f"{report}); resume with the data it started with, or start a new run (another output_dir, or --overwrite)."
    )


def _difference(saved: dict, now: dict) -> str:
    if saved.get("classes") != now.get("classes"):
        return f"classes now {now.get('classes')}, were {saved.get('classes')}"
    counts = [f"{role} records {saved.get(role)} -> {n}" for role, n in now.items() if saved.get(role) != n]
    counts = [c for c in counts if not c.startswith("digest")]
    return ", ".join(counts) or "as many records, but other images or labels"
