"""Readers: each turns one on-disk (or built-in) format into `LabeledImages` — items, integer labels, class names.

Formats: image folder tree (one sub-folder per class; hidden files and folders are skipped), CSV/JSONL (`path,label`,
or the columns named by data.image_column / data.label_column; paths relative to the file), a `datasets` dataset
(saved to disk or a hub id), and `builtin:mnist-5k` / `builtin:digits`. Every label becomes a class name through
`class_label`, so one class is one class whatever the file type. Text files must be UTF-8.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import re
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
    keys: list[str] | None = None  # per record, equal <=> the same image (core.identity); set by core.dataset.identify
    left_out: list[str] = field(default_factory=list)  # files of an image folder that Pillow cannot read

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
            keys=[self.keys[i] for i in indices] if self.keys is not None else None,
        )

    def __len__(self) -> int:
        return len(self.labels)


def read_dataset(
    spec: str,
    class_names: list[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    split: str = "train",
    names_from: str = "data.class_names",
) -> LabeledImages:
    """Dispatch on the form of `spec` (a path's type or the `builtin:` prefix); see the module docstring.
    `names_from` says where `class_names` came from (the recipe, the training data, a model), for messages."""
    if spec.startswith("builtin:"):
        return _read_builtin(spec.removeprefix("builtin:"))
    path = Path(spec).expanduser()
    classes = ClassList(class_names, names_from if class_names else "the data's own classes")
    if path.is_file() and path.suffix.lower() in READERS:
        return READERS[path.suffix.lower()](path, classes, image_column, label_column)
    if path.is_dir() and _is_hf_saved(path):
        return _read_hf(path, split, image_column, label_column, classes)
    if path.is_dir():
        return _read_imagefolder(path, classes)
    if path.exists():
        raise DataError(f"{path}: unsupported data file; use an image folder, a .csv or .jsonl file, or a dataset.")
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return _read_hf(spec, split, image_column, label_column, class_names)
    raise DataError(f"Data path {spec} does not exist; check data.train / data.val in the recipe.")


@dataclass(frozen=True)
class ClassList:
    """The class names a reader must map labels onto (None: take them from the data), and where they came from."""

    names: list[str] | None
    source: str = "data.class_names"

    def refuse(self, what: str, names: list[str], fix: str) -> DataError:
        """`what` is not one of the classes: one sentence that says whose classes they are and what to do."""
        if self.source == "data.class_names":
            return DataError(f"{what} is not in data.class_names {names}; {fix} or add it to data.class_names.")
        return DataError(f"{what} is not one of {self.source} {names}; {fix}.")


def _read_imagefolder(root: Path, class_names: ClassList) -> LabeledImages:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    if not folders:
        raise DataError(f"{root} has no class sub-folders; put each class's images in {root}/<class name>/.")
    names = _class_names(class_names.names) or list(dict.fromkeys(_folder_class(p) for p in folders))
    index = _class_index(names, str(root))
    items, labels, left_out = [], [], []
    for folder in folders:
        files, others = _folder_files(folder)
        if not files:
            raise DataError(_no_images(folder, others))
        if _folder_class(folder) not in index:
            raise class_names.refuse(f"Class folder {folder}", names, "remove the folder")
        items += files
        labels += [index[_folder_class(folder)]] * len(files)
        left_out += [str(p) for p in others]
    return LabeledImages(items, labels, names, str(root), left_out=left_out)


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """A class folder's visible files: those of a format Pillow reads, and the rest (left out, and said so)."""
    visible = sorted(p for p in folder.rglob("*") if _visible(p, folder))
    readable = [p for p in visible if p.suffix.lower() in IMAGE_EXTENSIONS]
    return readable, [p for p in visible if p.suffix.lower() not in IMAGE_EXTENSIONS]


def _no_images(folder: Path, others: list[Path]) -> str:
    """A class with nothing to train on is refused, not kept in the model; a folder of HEIC photos is not "empty"."""
    if not others:
        return f"Class folder {folder} has no images; add images or remove the folder."
    kinds = ", ".join(sorted({p.suffix.lower() or p.name for p in others}))
    return (
        f"Class folder {folder} has no images; its {len(others)} {kinds} file(s) are not a format Pillow reads, so "
        "convert them to JPEG or PNG, or remove the folder."
    )


def _hidden(name: str) -> bool:
    """Dot-files and dot-folders (macOS `._x.jpg`, `.ipynb_checkpoints/`, `.DS_Store`) and zip's `__MACOSX/`."""
    return name.startswith(".") or name == "__MACOSX"


def _visible(path: Path, folder: Path) -> bool:
    return path.is_file() and not any(_hidden(part) for part in path.relative_to(folder).parts)


def _folder_class(folder: Path) -> str:
    return class_label(folder.name) or folder.name


def _read_csv(
    path: Path, class_names: ClassList, image_column: str | None = None, label_column: str | None = None
) -> LabeledImages:
    header, rows, lines = read_csv_rows(path)
    return _from_rows(path, header, rows, lines, class_names, image_column, label_column)


def _read_jsonl(
    path: Path, class_names: ClassList, image_column: str | None = None, label_column: str | None = None
) -> LabeledImages:
    rows, lines = read_jsonl_rows(path, '{"path": ..., "label": ...}')
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return _from_rows(path, columns, rows, lines, class_names, image_column, label_column)


def _from_rows(
    path: Path,
    columns: list[str],
    rows: list[dict],
    lines: list[int],
    class_names: ClassList,
    image_column: str | None,
    label_column: str | None,
) -> LabeledImages:
    if not rows:
        raise DataError(f"{path} has no records; add `path,label` rows.")
    path_key, label_key = _row_columns(path, columns, image_column, label_column)
    items, found = [], []
    for n, row in zip(lines, rows, strict=True):
        file, label = row.get(path_key), _label_at(f"{path} line {n}", row.get(label_key))
        missing = [key for key, value in ((path_key, file), (label_key, label)) if _blank(value)]
        if missing:
            raise DataError(f"{path} line {n} has no {' or '.join(missing)}; fill it in or remove that line.")
        items.append((path.parent / str(file)).resolve())
        found.append((n, row.get(label_key), label))
    names = _class_names(class_names.names) or sorted({label for _, _, label in found}, key=_natural_key)
    index = _class_index(names, str(path))
    for n, value, label in found:
        if label not in index:
            raise class_names.refuse(f"{path} line {n}: label {value!r}", names, "fix the label or remove the line")
    return LabeledImages(items, [index[label] for _, _, label in found], names, str(path))


def _row_columns(path: Path, columns: list[str], image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The image-path and label columns: the ones the recipe names, else the usual names."""
    for chosen, key in ((image_column, "data.image_column"), (label_column, "data.label_column")):
        if chosen is not None and chosen not in columns:
            raise DataError(
                f"{path} has no column {chosen!r} ({key}); its columns are {sorted(columns)}, so fix {key}."
            )
    path_key = image_column or next((k for k in PATH_COLUMNS if k in columns), None)
    label_key = label_column or ("label" if "label" in columns else None)
    if path_key is None or label_key is None:
        raise DataError(
            f"{path} needs columns `path` and `label` (found {sorted(columns)}); rename the columns, or name "
            "them with data.image_column and data.label_column."
        )
    return path_key, label_key


# ---------------------------------------------------------------------------------------------- text files


def read_text(path: Path) -> str:
    """A text file's content, a leading byte-order mark dropped (spreadsheets write one) and line ends kept as they
    are; a file that is not UTF-8 is one DataError naming the line, not a UnicodeDecodeError traceback."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object.count(b"\n", 0, err.start) + 1
        how = " (in a spreadsheet, save as CSV UTF-8)" if path.suffix.lower() == ".csv" else ""
        raise DataError(
            f"{path} is not UTF-8 text (line {line} has the byte 0x{err.object[err.start]:02x}); save it as UTF-8{how}."
        ) from None


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """The header (names stripped), the records and each record's line; blank lines are skipped. Refused, naming the
    line: a quoted field that runs over lines (almost always a stray `"`, which makes the csv module swallow every
    row up to the next quote) and a row with more non-empty fields than the header (an unquoted comma)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header: list[str] | None = None
    rows, lines, end = [], [], 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if end > start:
                raise DataError(
                    f"{path} line {start} opens a quoted field that runs on to line {end}, which means a stray "
                    'quote ("); remove it, or write a quote inside a field as two ("").'
                )
            if not fields:
                continue
            if header is None:
                header = [name.strip() for name in fields]
            elif any(value.strip() for value in fields[len(header) :]):
                raise DataError(
                    f"{path} line {start} has {len(fields)} fields but the header has {len(header)}; quote a "
                    'field that holds a comma ("a, b") or remove the extra fields.'
                )
            else:
                rows.append({name: fields[k] if k < len(fields) else None for k, name in enumerate(header)})
                lines.append(start)
    except csv.Error as err:
        raise DataError(
            f'{path} line {reader.line_num} cannot be read as CSV ({err}); fix that line (a stray quote " is the '
            "usual cause)."
        ) from None
    return header or [], rows, lines


def read_jsonl_rows(path: Path, example: str) -> tuple[list[dict], list[int]]:
    """The JSON objects of a JSONL file with their line numbers; blank lines are skipped. `example` shows a record
    in the message for a line that is not an object."""
    rows, lines = [], []
    # split("\n"), not splitlines(): a JSON string may hold a raw U+2028 or form feed, which splitlines breaks on.
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {n} is not valid JSON ({err.msg}); fix or remove that line.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n} is not a JSON object; write each record as {example}.")
        rows.append(row)
        lines.append(n)
    return rows, lines


# ---------------------------------------------------------------------------------------------- labels


def class_label(value: Any) -> str | None:
    """The class name a label value stands for, so that one class is one class whatever the file type:

    - text loses surrounding whitespace: "cat " and "cat" are one class;
    - a whole number is written without a fraction: 1, 1.0, "1.0" and " 1 " are all "1" (pandas writes 1.0 to a
      CSV where a JSONL holds 1); other numbers keep Python's shortest form (0.5 -> "0.5"); text such as "01" stays;
    - None, empty text and NaN are no label (None: the caller names the record);
    - a boolean raises ValueError: true could stand for class 1 or for class "true", so the data must say which.
    """
    if value is None:
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # bool_: numpy's, from a datasets column
        raise ValueError("is a boolean, which could mean class 1 or class 'true'")
    if isinstance(value, str):
        whole = _WHOLE.fullmatch(value.strip())
        return (str(int(whole.group(1))) if whole else value.strip()) or None
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return None
        return str(int(number)) if number.is_integer() else repr(number)
    raise ValueError(f"is a {type(value).__name__}, not one class")


def _label_at(where: str, value: Any) -> str | None:
    try:
        return class_label(value)
    except ValueError as err:
        raise DataError(f"{where}: label {value!r} {err}; write each class as text or a number.") from None


def _class_names(class_names: list[str] | None) -> list[str] | None:
    """data.class_names under the same rule as the labels, so "1.0" in the recipe matches 1 in the data."""
    if not class_names:
        return None
    return [_label_at("data.class_names", name) or str(name) for name in class_names]


def _blank(value: Any) -> bool:
    return value is None or str(value).strip() == ""


def _read_hf(
    spec: str | Path, split: str, image_column: str | None, label_column: str | None, class_names: ClassList
) -> LabeledImages:
    import datasets

    ds = load_saved_dataset(spec, split)
    image_col = image_column or pick_column(ds, ("image", "img", "pixel_values"), spec, "set data.image_column")
    label_col = label_column or pick_column(ds, ("label", "labels", "fine_label"), spec, "set data.label_column")
    for col, key in ((image_col, "data.image_column"), (label_col, "data.label_column")):
        if col not in ds.column_names:
            raise DataError(f"Dataset {spec} has no column {col!r} ({key}); columns are {ds.column_names}.")
    if isinstance(ds.features[image_col], datasets.Image) and ds.features[image_col].decode:
        # Keep the bytes: open_image decodes them, so the pixel cap applies and bad bytes become a BadSample.
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    feature = ds.features[label_col]
    raw = ds[label_col]
    if hasattr(feature, "names"):
        # Out-of-range ids (-1 marks unlabelled records) must fail below, not wrap round to the last class.
        raw = [feature.names[i] if isinstance(i, int) and 0 <= i < len(feature.names) else i for i in raw]
    found = [_label_at(f"Dataset {spec} record {i}", value) for i, value in enumerate(raw)]
    if hasattr(feature, "names"):
        names = _class_names(class_names.names) or _class_names(list(feature.names))  # ClassLabel order, not sorted
    else:
        names = _class_names(class_names.names) or sorted({v for v in found if v is not None}, key=_natural_key)
    index = _class_index(names, str(spec))
    labels = []
    for i, (value, label) in enumerate(zip(raw, found, strict=True)):
        if label is None:
            raise DataError(f"Dataset {spec} record {i} has no label; fill it in or drop that record.")
        if label not in index:
            raise class_names.refuse(f"Dataset {spec} record {i}: label {value!r}", names, "fix or drop that record")
        labels.append(index[label])
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


def load_saved_dataset(spec: str | Path, split: str | None) -> Any:
    """A `datasets` dataset saved to disk (a Path) or a hub id from the offline cache (a str), failing in one
    sentence. Of a DatasetDict, `split` picks one split (the first if it is absent); None keeps the dict."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(spec)) if isinstance(spec, Path) else datasets.load_dataset(spec)
    except Exception as err:  # datasets raises many types; the user needs one sentence
        raise DataError(
            f"Cannot load dataset {spec} ({type(err).__name__}: {err}); offline, use a folder saved "
            "with `Dataset.save_to_disk`."
        ) from None
    if split is not None and isinstance(ds, datasets.DatasetDict):
        ds = ds[split if split in ds else next(iter(ds))]
    return ds


def pick_column(ds: Any, candidates: tuple[str, ...], spec: Any, fix: str) -> str:
    """The first of `candidates` among the dataset's columns; else one sentence ending in `fix`."""
    found = next((c for c in candidates if c in ds.column_names), None)
    if found is None:
        raise DataError(f"Dataset {spec}: none of {list(candidates)} is among {ds.column_names}; {fix}.")
    return found


def _class_index(names: list[str], where: str) -> dict[str, int]:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{where}: class names {dupes} appear more than once; make data.class_names unique.")
    return {n: i for i, n in enumerate(names)}


def _natural_key(s: str) -> tuple:
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


PATH_COLUMNS = ("path", "image", "file", "filename")  # image-path columns found without data.image_column
_WHOLE = re.compile(r"([+-]?\d+)\.0*")  # "1.0", "-2.", "3.000": whole numbers written as floats

READERS: dict[str, Callable[[Path, list[str] | None, str | None, str | None], LabeledImages]] = {
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
}
