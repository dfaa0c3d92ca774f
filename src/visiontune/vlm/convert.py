"""Task datasets -> conversation records for VLM fine-tuning (`visiontune convert`).

Writes LLaMA-Factory ShareGPT JSON, which `conversations.read_conversations` loads:
`[{"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", "content": "..."}],
"images": ["images/ab12.png"]}]`. Image paths are relative to the output file's folder; images held inside a dataset
(encoded bytes or PIL images) are written next to it as `images/<content hash>.png`, so an image shared by several
records (ChartQA asks many questions per chart) is stored once and a re-run rewrites nothing.

Kinds:
- `cord`: receipts -> their `gt_parse` as compact JSON. A saved `datasets` dataset with `image` and `ground_truth`
  (a JSON string, as in naver-clova-ix/cord-v2), or a folder of `*.png|*.jpg` images each with a same-named `.json`
  ground truth (its `gt_parse`, or the whole object when it has none).
- `chartqa`: (image, query, label) -> user query, assistant label. A saved dataset with `image`, `query`, `label`
  (a list of labels: the first is the answer), or a JSON/JSONL file of `{"imgname"|"image", "query", "label"}`
  records with image paths relative to the file or to `image_root`.
Conversion stops at the first bad record with a DataError naming it: a half-converted training set is worse than none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from visiontune.core.errors import DataError
from visiontune.core.images import BadImage, open_image
from visiontune.core.readers import load_saved_dataset
from visiontune.vlm.conversations import DEFAULT_MAX_PIXELS, IMAGE_TOKEN

CORD_PROMPT = "Extract the receipt's fields as JSON."
QUERY = "{query}"  # where a chartqa prompt template puts the question
CORD_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
IMAGES_DIR = "images"
BATCH_ROWS = 256  # rows pulled from Arrow at a time: memory stays bounded on datasets of large images

ImageInput = Path | bytes | Image.Image  # Path: a file that must exist; bytes/PIL: written out as PNG


@dataclass
class Example:
    """One question about one image, before its image is placed next to the output."""

    ref: str  # "FILE record 3" / "FILE line 4" / "FILE", for messages
    image: ImageInput
    user: str  # with one `<image>` placeholder
    answer: str


# ---------------------------------------------------------------------------------------------------- driver


def convert(
    kind: str,
    input: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    prompt: str | None = None,
) -> int:
    """Convert `input` (a `kind` dataset) into a ShareGPT conversation JSON at `out`; returns the record count."""
    converter = CONVERTERS.get(kind)
    if converter is None:
        raise DataError(f"Unknown dataset kind {kind!r}; use one of {sorted(CONVERTERS)}.")
    source, target = Path(input).expanduser(), Path(out).expanduser().resolve()
    if not source.exists():
        raise DataError(f"Input {source} does not exist; check the path.")
    if target.suffix.lower() != ".json":
        raise DataError(f"Output {out} does not end in .json, the format convert writes; give a .json path.")
    root = Path(image_root).expanduser().resolve() if image_root else None
    if root is not None and not root.is_dir():
        raise DataError(f"Image root {image_root} is not a folder; give the folder the image paths are relative to.")
    if prompt is not None and prompt.count(IMAGE_TOKEN) > 1:
        raise DataError(f"The prompt {prompt!r} has several {IMAGE_TOKEN} placeholders; keep at most one per record.")
    target.parent.mkdir(parents=True, exist_ok=True)
    records = [_record(example, target.parent) for example in converter(source, root, prompt)]
    if not records:
        raise DataError(f"{source} has no records to convert; point at a dataset that has some.")
    tmp = target.with_name(target.name + ".tmp")  # an interrupted run never leaves a truncated file behind
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(target)
    return len(records)


def _record(example: Example, out_dir: Path) -> dict:
    if (example.user + example.answer).count(IMAGE_TOKEN) != 1:
        raise DataError(
            f"{example.ref} has {IMAGE_TOKEN} in its text, which readers take for a second image placeholder; "
            "remove it from the record."
        )
    return {
        "messages": [{"role": "user", "content": example.user}, {"role": "assistant", "content": example.answer}],
        "images": [_place_image(example.image, example.ref, out_dir)],
    }


def _place_image(image: ImageInput, ref: str, out_dir: Path) -> str:
    """The image's path relative to `out_dir`, writing in-dataset images there first."""
    if isinstance(image, Path):
        if not image.is_file():
            raise DataError(
                f"{ref} names image {image}, which does not exist; fix the path or pass --image-root (image_root) "
                "as the folder the paths are relative to."
            )
        return Path(os.path.relpath(image, out_dir)).as_posix()
    data = image if isinstance(image, bytes) else _png_bytes(image)
    name = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()[:24]}.png"
    path = out_dir / name
    if not path.is_file():  # content-addressed: the same image from many records or runs is decoded once
        png = _png_bytes(_decode(data, ref))
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
    return name


def _decode(data: bytes, ref: str) -> Image.Image:
    try:
        # EXIF rotation applied and RGB, as training will see it; PNG cannot hold JPEG's CMYK anyway.
        return open_image(data, DEFAULT_MAX_PIXELS)
    except BadImage as err:
        raise DataError(f"{ref} has an image that {err}; replace the image or remove the record.") from None


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- cord


def convert_cord(source: Path, image_root: Path | None, prompt: str | None) -> Iterator[Example]:
    """CORD receipts: a saved dataset (`image`, `ground_truth`) or a folder of images with same-named .json."""
    user = _with_image(prompt or CORD_PROMPT)
    if _is_saved_dataset(source):
        for ref, row in _dataset_rows(source, ("image", "ground_truth")):
            target = _cord_target(row["ground_truth"], ref)
            yield Example(ref, _row_image(row["image"], ref, image_root or source.parent), user, target)
    elif source.is_dir():
        for image, truth in _cord_pairs(source):
            target = _cord_target(truth.read_text(encoding="utf-8-sig"), str(truth))
            yield Example(str(truth), image.resolve(), user, target)
    else:
        raise DataError(
            f"{source} is a file, but cord reads a saved `datasets` folder or a folder of images with same-named "
            ".json ground truth; point at the folder."
        )


def _cord_target(value: Any, ref: str) -> str:
    """The `gt_parse` object (or the whole object without one) as compact JSON, keys in the annotators' order."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{ref} has ground truth that is not valid JSON ({err.msg} at line {err.lineno} column "
                f"{err.colno}); fix or remove that record."
            ) from None
    if not isinstance(value, dict):
        raise DataError(
            f"{ref} has ground truth that is {type(value).__name__}, not a JSON object; write it as "
            '{"gt_parse": {...}}.'
        )
    target = value.get("gt_parse", value)
    if not isinstance(target, dict | list) or not target:
        raise DataError(f"{ref} has an empty gt_parse (or one that is not an object); fill it in or remove the record.")
    return json.dumps(target, ensure_ascii=False, sort_keys=False, separators=(",", ":"))


def _cord_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, ground truth) pairs by file stem; an unpaired file is an error, since it is probably a typo."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    truths = {p.stem: p for p in files if p.suffix.lower() == ".json"}
    images: dict[str, Path] = {}
    for image in (p for p in files if p.suffix.lower() in CORD_IMAGE_SUFFIXES):
        if image.stem in images:
            raise DataError(
                f"{folder} has two images named {image.stem} ({images[image.stem].name}, {image.name}); keep one "
                f"so that {image.stem}.json pairs with a single image."
            )
        images[image.stem] = image
    for stem, truth in truths.items():
        if stem not in images:
            raise DataError(f"{truth} has no image {stem}.png or {stem}.jpg next to it; add the image or remove it.")
    for stem, image in images.items():
        if stem not in truths:
            raise DataError(f"{image} has no ground truth {stem}.json next to it; add it or remove the image.")
    if not images:
        raise DataError(
            f"{folder} holds no .png/.jpg images with same-named .json ground truth; point at such a folder or at "
            "a dataset saved with `Dataset.save_to_disk`."
        )
    return [(images[stem], truths[stem]) for stem in sorted(images)]


# ---------------------------------------------------------------------------------------------------- chartqa


def convert_chartqa(source: Path, image_root: Path | None, prompt: str | None) -> Iterator[Example]:
    """ChartQA: a saved dataset (`image`, `query`, `label`) or a JSON/JSONL file of {imgname|image, query, label}."""
    template = prompt or QUERY
    if QUERY not in template:
        raise DataError(f"The prompt {prompt!r} has no {QUERY}; put {QUERY} where the chartqa question goes.")
    if _is_saved_dataset(source):
        for ref, row in _dataset_rows(source, ("image", "query", "label")):
            image = _row_image(row["image"], ref, image_root or source.parent)
            yield _chartqa_example(ref, image, row, template)
    elif source.is_file() and source.suffix.lower() in (".json", ".jsonl"):
        for ref, record in _json_records(source):
            yield _chartqa_example(ref, _record_image(record, ref, image_root or source.parent), record, template)
    else:
        raise DataError(
            f"{source} is neither a saved `datasets` folder nor a .json/.jsonl file; point chartqa at one of those."
        )


def _chartqa_example(ref: str, image: ImageInput, record: dict, template: str) -> Example:
    query, label = record.get("query"), record.get("label")
    if isinstance(label, list):  # ChartQA on the hub keeps a list of accepted answers; the first is canonical
        label = label[0] if label else None
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{ref} has an empty or missing query; write the question or remove the record.")
    if isinstance(label, int | float) and not isinstance(label, bool):
        label = str(label)  # numeric answers written as JSON numbers
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"{ref} has an empty or missing label; write the answer or remove the record.")
    return Example(ref, image, _with_image(template).replace(QUERY, query.strip()), label.strip())


def _record_image(record: Any, ref: str, root: Path) -> Path:
    if not isinstance(record, dict):
        raise DataError(
            f'{ref} is {type(record).__name__}, not an object; write it as {{"imgname", "query", "label"}}.'
        )
    name = record.get("imgname", record.get("image"))
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{ref} has no imgname or image; give the chart's file name, relative to {root}.")
    return (root / name).resolve()


def _json_records(path: Path) -> list[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        return [(f"{path} line {n}", _parse(line, f"{path} line {n}")) for n, line in _lines(text)]
    doc = _parse(text, str(path))
    if not isinstance(doc, list):
        raise DataError(f'{path} is not a JSON list of records; write it as [{{"imgname", "query", "label"}}, ...].')
    return [(f"{path} record {i}", record) for i, record in enumerate(doc)]


def _lines(text: str) -> Iterator[tuple[int, str]]:
    return ((n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip())


def _parse(text: str, ref: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{ref} is not valid JSON ({err.msg} at line {err.lineno}); fix it.") from None


# ---------------------------------------------------------------------------------------------------- shared


def _with_image(text: str) -> str:
    """A prompt without a placeholder gets the image first, as LLaVA-style data puts it."""
    return text if IMAGE_TOKEN in text else IMAGE_TOKEN + text


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def _dataset_rows(folder: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """Rows of a saved dataset as plain Python objects; image columns stay {"bytes", "path"} (no decoding)."""
    import datasets

    ds = load_saved_dataset(folder, split=None)
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(
            f"{folder} holds the splits {list(ds)}; convert one split at a time by pointing at its folder, e.g. "
            f"{folder / next(iter(ds))}."
        )
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{folder} has no column(s) {missing} (its columns are {ds.column_names}); rename its columns to "
            f"{list(columns)} with `Dataset.rename_column`."
        )
    table = ds.select_columns(list(columns)).with_format("arrow")
    for start in range(0, len(table), BATCH_ROWS):
        for offset, row in enumerate(table[start : start + BATCH_ROWS].to_pylist()):
            yield f"{folder} record {start + offset}", row


def _row_image(value: Any, ref: str, root: Path) -> ImageInput:
    if isinstance(value, dict):  # datasets.Image storage: embedded bytes, or only the path it was cast from
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | Image.Image):
        return value
    if isinstance(value, str) and value.strip():
        return (root / value).resolve()  # an absolute path stays as it is
    raise DataError(f"{ref} has no image (found {type(value).__name__}); give it one or remove the record.")


Converter = Callable[[Path, Path | None, str | None], Iterator[Example]]
CONVERTERS: dict[str, Converter] = {
    "cord": convert_cord,
    "chartqa": convert_chartqa,
}
