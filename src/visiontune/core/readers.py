"""Readers: each turns one on-disk (or built-in) format into `LabeledImages` — items, integer labels, class names.

Formats: image folder tree (one sub-folder per class), CSV/JSONL (`path,label`, paths relative to the file),
a `datasets` dataset (saved to disk or a hub id), and `builtin:mnist-5k` / `builtin:digits`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.core.errors import DataError
from visiontune.core.images import IMAGE_EXTENSIONS


@dataclass
class LabeledImages:
    """A labelled image set. `items[i]` is a file path, an in-memory array, or a row index (see `kind`)."""

    items: Sequence[Any]
    labels: list[int]
    class_names: list[str]
    origin: str
    kind: str = "file"  # "file" | "array" | "hf"
    hf_dataset: Any = None
    image_column: str | None = None
    refs: list[str] = field(default_factory=list)

    def ref(self, i: int) -> str:
        """Human-readable name of record i, for error messages."""
        if self.kind == "file":
            return str(self.items[i])
        return f"{self.origin} record {i}"

    def subset(self, indices: Sequence[int]) -> LabeledImages:
        items = [self.items[i] for i in indices] if self.kind != "array" else self.items[list(indices)]
        return LabeledImages(
            items,
            [self.labels[i] for i in indices],
            self.class_names,
            self.origin,
            self.kind,
            self.hf_dataset,
            self.image_column,
        )

    def __len__(self) -> int:
        return len(self.labels)


def read_dataset(
    spec: str,
    class_names: list[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    split: str = "train",
) -> LabeledImages:
    """Dispatch on the form of `spec` (a path's type or the `builtin:` prefix); see the module docstring."""
    if spec.startswith("builtin:"):
        return _read_builtin(spec.removeprefix("builtin:"))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in READERS:
        return READERS[path.suffix.lower()](path, class_names)
    if path.is_dir() and _is_hf_saved(path):
        return _read_hf(path, split, image_column, label_column, class_names)
    if path.is_dir():
        return _read_imagefolder(path, class_names)
    if path.exists():
        raise DataError(f"{path}: unsupported data file; use an image folder, a .csv or .jsonl file, or a dataset.")
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return _read_hf(spec, split, image_column, label_column, class_names)
    raise DataError(f"Data path {spec} does not exist; check data.train / data.val in the recipe.")


def _read_imagefolder(root: Path, class_names: list[str] | None) -> LabeledImages:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class sub-folders; put each class's images in {root}/<class name>/.")
    names = class_names or [p.name for p in folders]
    index = _class_index(names, str(root))
    items, labels = [], []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"Class folder {folder} has no images; add images or remove the folder.")
        if folder.name not in index:
            raise DataError(f"Class folder {folder} is not in data.class_names {names}; add it or remove the folder.")
        items += files
        labels += [index[folder.name]] * len(files)
    return LabeledImages(items, labels, names, str(root))


def _read_csv(path: Path, class_names: list[str] | None) -> LabeledImages:
    rows, lines = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(f)
        for row in reader:  # blank lines are skipped, so keep each row's own line number for messages
            rows.append(row)
            lines.append(reader.line_num)
    return _from_rows(path, rows, lines, class_names)


def _read_jsonl(path: Path, class_names: list[str] | None) -> LabeledImages:
    rows, lines = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {n} is not valid JSON ({err.msg}); fix or remove that line.") from None
        if not isinstance(row, dict):
            raise DataError(
                f'{path} line {n} is not a JSON object; write each record as {{"path": ..., "label": ...}}.'
            )
        rows.append(row)
        lines.append(n)
    return _from_rows(path, rows, lines, class_names)


def _from_rows(path: Path, rows: list[dict], lines: list[int], class_names: list[str] | None) -> LabeledImages:
    if not rows:
        raise DataError(f"{path} has no records; add `path,label` rows.")
    path_key = next((k for k in ("path", "image", "file", "filename") if k in rows[0]), None)
    if path_key is None or "label" not in rows[0]:
        raise DataError(f"{path} needs columns `path` and `label` (found {sorted(rows[0])}); rename the columns.")
    for n, row in zip(lines, rows, strict=True):
        missing = [k for k in (path_key, "label") if row.get(k) in (None, "")]
        if missing:
            raise DataError(f"{path} line {n} has no {' or '.join(missing)}; fill it in or remove that line.")
    names = class_names or sorted({str(r["label"]) for r in rows}, key=_natural_key)
    index = _class_index(names, str(path))
    items, labels = [], []
    for n, row in zip(lines, rows, strict=True):
        label = str(row.get("label"))
        if label not in index:
            raise DataError(
                f"{path} line {n}: label {label!r} is not in the class list {names}; "
                "fix the label or add it to data.class_names."
            )
        items.append((path.parent / str(row[path_key])).resolve())
        labels.append(index[label])
    return LabeledImages(items, labels, names, str(path))


def _read_hf(
    spec: str | Path, split: str, image_column: str | None, label_column: str | None, class_names: list[str] | None
) -> LabeledImages:
    import datasets

    try:
        ds = datasets.load_from_disk(str(spec)) if isinstance(spec, Path) else datasets.load_dataset(spec)
    except Exception as err:  # datasets raises many types; the user needs one sentence
        raise DataError(
            f"Cannot load dataset {spec} ({type(err).__name__}: {err}); offline, use a folder saved "
            "with `Dataset.save_to_disk`."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        pick = split if split in ds else next(iter(ds))
        ds = ds[pick]
    image_col = image_column or _pick_column(ds, ("image", "img", "pixel_values"), spec, "data.image_column")
    label_col = label_column or _pick_column(ds, ("label", "labels", "fine_label"), spec, "data.label_column")
    for col, key in ((image_col, "data.image_column"), (label_col, "data.label_column")):
        if col not in ds.column_names:
            raise DataError(f"Dataset {spec} has no column {col!r} ({key}); columns are {ds.column_names}.")
    if isinstance(ds.features[image_col], datasets.Image) and ds.features[image_col].decode:
        # Keep the bytes: open_image decodes them, so the pixel cap applies and bad bytes become a BadSample.
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    feature = ds.features[label_col]
    raw = ds[label_col]
    if hasattr(feature, "names"):
        names = class_names or list(feature.names)
        # Out-of-range ids (-1 marks unlabelled records) must fail below, not wrap round to the last class.
        raw = [feature.names[i] if isinstance(i, int) and 0 <= i < len(feature.names) else i for i in raw]
    else:
        names = class_names or sorted({str(v) for v in raw}, key=_natural_key)
    index = _class_index(names, str(spec))
    labels = []
    for i, value in enumerate(raw):
        if str(value) not in index:
            raise DataError(
                f"Dataset {spec} record {i}: label {value!r} is not in the class list {names}; "
                "fix or drop that record, or add the label to data.class_names."
            )
        labels.append(index[str(value)])
    return LabeledImages(list(range(len(ds))), labels, names, str(spec), "hf", ds, image_col)


def _read_builtin(spec: str) -> LabeledImages:
    """`mnist-5k`, or `mnist-5k:0-4` / `digits:5,7` for a subset of the digits (labels renumbered 0..k-1)."""
    import numpy as np

    from visiontune.core.assets import load_digit_arrays

    name, _, subset = spec.partition(":")
    images, labels, names = load_digit_arrays(name)
    if subset:
        keep = _digit_subset(subset, spec)
        mask = np.isin(labels, keep)
        remap = {d: i for i, d in enumerate(keep)}
        images, labels, names = images[mask], np.array([remap[int(v)] for v in labels[mask]]), [str(d) for d in keep]
    return LabeledImages(images, labels.tolist(), names, f"builtin:{spec}", "array")


def _digit_subset(subset: str, spec: str) -> list[int]:
    try:
        digits: list[int] = []
        for part in subset.split(","):
            lo, _, hi = part.partition("-")
            digits += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        digits = []
    if not digits or any(not 0 <= d <= 9 for d in digits) or len(set(digits)) != len(digits):
        raise DataError(f"builtin:{spec}: the digit subset must look like 0-4 or 1,3,5 (digits 0-9, no repeats).")
    return digits


def _is_hf_saved(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _pick_column(ds: Any, candidates: tuple[str, ...], spec: Any, key: str) -> str:
    found = next((c for c in candidates if c in ds.column_names), None)
    if found is None:
        raise DataError(f"Dataset {spec}: set {key}; none of {list(candidates)} is among {ds.column_names}.")
    return found


def _class_index(names: list[str], where: str) -> dict[str, int]:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{where}: class names {dupes} appear more than once; make data.class_names unique.")
    return {n: i for i, n in enumerate(names)}


def _natural_key(s: str) -> tuple:
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


READERS: dict[str, Callable[[Path, list[str] | None], LabeledImages]] = {
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
}
