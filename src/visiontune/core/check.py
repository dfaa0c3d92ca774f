"""Check whole datasets once before training (every image decoded as training will decode it) and apply
`data.on_bad_sample`. Train and val are checked together, so one error names the bad files of both; the full list
goes to a report file, as an error names only the first `LISTED`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from visiontune.core.errors import DataError
from visiontune.core.images import BadImage, check_image, hf_image_value, open_image
from visiontune.core.readers import LabeledImages

LISTED = 10  # bad records an error names; the rest are counted, and all are written to the report file


@dataclass
class BadSample:
    index: int  # within its split
    ref: str
    reason: str
    split: str = ""  # "train", "val", ... when several splits are checked together


@dataclass(frozen=True)
class Wording:
    """How messages name a data type's records and its sets: "3 bad train samples in DATASET"."""

    noun: str
    data: str
    content: str  # what data.<split> should point at


SAMPLES = Wording("sample", "dataset", "images")


class Checkable(Protocol):
    origin: str

    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int]) -> Any: ...


D = TypeVar("D", bound=Checkable)


def find_bad_samples(data: LabeledImages, max_pixels: int, workers: int = 4) -> list[BadSample]:
    """Every record that cannot be used, with the reason. In-memory arrays are always fine."""
    if data.kind == "array":
        return []

    def probe(i: int) -> BadSample | None:
        try:
            if data.kind == "file":
                check_image(data.items[i], max_pixels)
            else:
                open_image(hf_image(data, i), max_pixels)
        except BadImage as err:
            return BadSample(i, data.ref(i), str(err))
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # decoding releases the GIL: threads overlap
        return [b for b in pool.map(probe, range(len(data))) if b is not None]


def clean(data: LabeledImages, policy: str, max_pixels: int, role: str) -> tuple[LabeledImages, list[BadSample]]:
    """Return the usable subset; with policy `error`, stop on the first problem found (after checking all)."""
    kept, bad = clean_splits({role: data}, policy, max_pixels)
    return kept[role], bad


def clean_splits(
    splits: dict[str, LabeledImages], on_bad_sample: str, max_pixels: int
) -> tuple[dict[str, LabeledImages], list[BadSample]]:
    """Check every split (e.g. {"train": ..., "val": ...}) before stopping, so one error lists the bad files of all
    of them; with `skip`, each split keeps its usable samples. Returns the kept splits and every bad sample."""
    return check_splits(splits, lambda data: find_bad_samples(data, max_pixels), on_bad_sample, SAMPLES)


def check_splits(
    splits: dict[str, D], find: Callable[[D], list[BadSample]], on_bad_sample: str, wording: Wording
) -> tuple[dict[str, D], list[BadSample]]:
    """`clean_splits` for any record set with `origin`, `len` and `subset` (image sets, caption pairs)."""
    for role, data in splits.items():
        if len(data) == 0:
            where = f"{role} {wording.data} {data.origin}"
            raise DataError(f"The {where} is empty; point data.{role} at {wording.content}.")
    found = {role: [replace(b, split=role) for b in find(data)] for role, data in splits.items()}
    bad = [b for role_bad in found.values() for b in role_bad]
    if bad and on_bad_sample == "error":
        origin = next(iter(splits.values())).origin if len(splits) == 1 else None
        what = bad_count(wording.noun, {role: len(b) for role, b in found.items()}, origin)
        raise bad_records_error([_entry(b, len(splits)) for b in bad], what, wording.noun)
    return {role: _keep(data, found[role], role, wording.noun) for role, data in splits.items()}, bad


def bad_count(noun: str, counts: dict[str, int], origin: str | None = None) -> str:
    """The count that opens an error: `7 bad train sample(s) in ORIGIN`, or over several splits `7 bad sample(s) in
    the train and val data (5 train, 2 val)`; an empty split name is left out (`7 bad conversation(s)`)."""
    total = sum(counts.values())
    if len(counts) == 1:
        role = next(iter(counts))
        return f"{total} bad {role + ' ' if role else ''}{noun}(s)" + (f" in {origin}" if origin else "")
    per_split = ", ".join(f"{n} {role}" for role, n in counts.items())
    return f"{total} bad {noun}(s) in the {' and '.join(counts)} data ({per_split})"


def bad_records_error(entries: Sequence[str], what: str, noun: str) -> DataError:
    """One sentence: `what`, the first LISTED "record reason" entries, how many more, and the report file holding
    them all (written now: at check time there is no run folder yet)."""
    listed = "; ".join(entries[:LISTED]) + (f"; ... and {len(entries) - LISTED} more" if len(entries) > LISTED else "")
    report = write_report(entries, f"bad-{noun}s")
    where = f" (the full list is in {report})" if report else ""
    return DataError(
        f"{what}: {listed}{where}; fix or remove them, or set data.on_bad_sample=skip to train without them."
    )


def write_report(lines: Sequence[str], stem: str) -> Path | None:
    """Write `lines` to $VISIONTUNE_CACHE/reports/STEM-TIME.txt (default ~/.cache/visiontune); None if it cannot."""
    cache = Path(os.environ.get("VISIONTUNE_CACHE", Path.home() / ".cache" / "visiontune"))
    path = cache / "reports" / f"{stem}-{datetime.now():%Y%m%d-%H%M%S-%f}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    except OSError:  # a read-only cache must not hide the data error being reported
        return None
    return path


def _entry(bad: BadSample, n_splits: int) -> str:
    return f"{bad.ref} ({bad.split}) {bad.reason}" if n_splits > 1 and bad.split else f"{bad.ref} {bad.reason}"


def _keep(data: D, bad: list[BadSample], role: str, noun: str) -> D:
    if not bad:
        return data
    bad_index = {b.index for b in bad}
    kept = data.subset([i for i in range(len(data)) if i not in bad_index])
    if len(kept) == 0:
        raise DataError(f"Every {role} {noun} in {data.origin} is bad (first: {bad[0].ref} {bad[0].reason}).")
    return kept


def hf_image(data: LabeledImages, i: int):
    return hf_image_value(data.hf_dataset, int(data.items[i]), data.image_column)


def say(line: str) -> None:
    """One line on stderr, from the first process only (every rank reads and checks the data)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from rich.console import Console

    Console(stderr=True, highlight=False).print(line, markup=False, soft_wrap=True)


def say_left_out(files: Sequence[str]) -> None:
    """Name the files an image folder held that Pillow cannot read (all of them go to data_report.json)."""
    if files:
        named = ", ".join(files[:LISTED]) + (f" and {len(files) - LISTED} more" if len(files) > LISTED else "")
        say(f"Left out {len(files)} file(s) that are not a format Pillow reads: {named} (listed in data_report.json).")


@dataclass
class CheckedSplits(Generic[D]):
    """A task's training and validation records, read and checked, and what data.on_bad_sample: skip left out."""

    train: D
    val: D
    skipped: list[BadSample] = field(default_factory=list)


def read_splits(
    data: Any,
    seed: int,
    read: Callable[[str, str, list[str] | None], D],
    split: Callable[[D, float, int], tuple[D, D]],
    find: Callable[[D], list[BadSample]],
    wording: Wording,
) -> CheckedSplits[D]:
    """A recipe's `data.train` and `data.val` (or a seeded `split(train, data.val_split, seed)`), each read with
    `read(path, split_name, class_names)` (val with train's classes), then the images of both checked at once with
    `find`; `skipped` holds what the readers' and the check's data.on_bad_sample: skip left out."""
    train = read(data.train, "train", data.class_names)
    skipped = list(train.skipped)
    if data.val:
        val = read(data.val, "val", train.class_names)
        skipped += val.skipped
    else:
        train, val = split(train, data.val_split, seed)
    kept, bad = check_splits({"train": train, "val": val}, find, data.on_bad_sample, wording)
    return CheckedSplits(kept["train"], kept["val"], skipped + bad)
