"""Conversations for VLM supervised fine-tuning: readers into one normalised record, the structural and image checks,
and the conversion to the chat-message format that `processor.apply_chat_template` and TRL take.

Formats (dispatch on what the path is: a file by suffix, a folder by the marker file it holds):
- LLaMA-Factory ShareGPT JSON/JSONL: `messages` (role/content) or `conversations` (from/value), `<image>` placeholders
  in the text, an `images` list and an optional `system` column; registered in a `dataset_info.json` (`file_name`,
  `formatting: sharegpt`, `columns`, `tags`), which may be given directly (plus `dataset_name`) or as its folder.
- LLaVA JSON: `[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}]`; `image` is
  one path, a list of paths, or absent (text-only).
- TRL / HF chat JSONL or a `datasets` dataset saved to disk: `messages` whose content is a string or a list of
  `{"type": "image"}` / `{"type": "text", "text": ...}` parts, and an `images` column (paths, bytes or PIL images).
Image paths are relative to the data file's folder (a `dataset_info.json` folder for LLaMA-Factory registrations,
as LLaMA-Factory itself does; the folder holding a saved dataset), or to `image_root` when given.

Reading never stops on one bad record: a record that cannot be normalised keeps its reason in `Conversation.problem`
so that `check_conversations` can report it with the rest, or drop it under `on_bad_sample="skip"`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from visiontune.core.check import bad_count, bad_records_error
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.core.errors import DataError, SampleError
from visiontune.core.identity import duplicates, groups, image_keys, memory_digest, refuse_shared
from visiontune.core.images import BadImage, check_image, open_image
from visiontune.core.readers import load_saved_dataset, read_text

Role = Literal["system", "user", "assistant"]
ImageSource = Path | bytes | Image.Image  # Path: absolute; bytes: an encoded image file
IMAGE_TOKEN = "<image>"
DEFAULT_MAX_PIXELS = PIL_MAX_PIXELS
LLAMAFACTORY_INFO = "dataset_info.json"
# Without a LLaMA-Factory `tags` mapping, accept the role names of every supported format.
DEFAULT_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
COLUMN_KEYS = ("messages", "images", "system")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class Turn:
    role: Role
    text: str  # `<image>` placeholders stay in the text where the images go


@dataclass
class Conversation:
    turns: list[Turn]
    images: list[ImageSource]  # in the order of the `<image>` placeholders
    ref: str  # where it came from, for messages: "FILE record 12" / "FILE line 13"
    problem: str | None = None  # set by the reader when the record could not be normalised (turns/images empty)
    keys: tuple[str, ...] | None = None  # what makes two records the same (`identify_conversations`)


@dataclass
class _Schema:
    """Where a record keeps its parts. role_tag None: each message says itself (role/content or from/value)."""

    messages: str
    images: str | None = None
    system: str | None = None
    role_tag: str | None = None
    content_tag: str | None = None
    roles: dict[str, Role] = field(default_factory=lambda: dict(DEFAULT_ROLES))


@dataclass
class _Request:
    image_root: Path | None
    dataset_name: str | None
    columns: dict[str, str] | None
    split: str


class _Bad(Exception):
    """A record-level problem with its fix in brackets; becomes `Conversation.problem`."""


# ---------------------------------------------------------------------------------------------------- reading


def read_conversations(
    spec: str | Path,
    image_root: str | Path | None = None,
    dataset_name: str | None = None,
    columns: dict[str, str] | None = None,
    split: str = "train",
) -> list[Conversation]:
    """Read a conversation file, a LLaMA-Factory `dataset_info.json` (or its folder) or a saved `datasets` dataset.
    `columns` maps `messages` / `images` / `system` to the data's own column names; see the module docstring."""
    if columns is not None:
        unknown = sorted(set(columns) - set(COLUMN_KEYS))
        if unknown:
            raise DataError(f"columns has unknown key(s) {unknown}; use only {list(COLUMN_KEYS)}.")
    if str(spec).startswith("builtin:"):
        from visiontune.vlm.builtin_conversations import read_builtin_conversations

        return read_builtin_conversations(str(spec).removeprefix("builtin:"))
    path = Path(spec).expanduser()
    root = Path(image_root).expanduser().resolve() if image_root else None
    request = _Request(root, dataset_name, dict(columns) if columns else None, split)
    if path.is_file() and path.suffix.lower() in FILE_READERS:
        return FILE_READERS[path.suffix.lower()](path, request)
    if path.is_dir():
        marker = next((name for name in FOLDER_READERS if (path / name).is_file()), None)
        if marker is None:
            raise DataError(
                f"{path} holds neither {LLAMAFACTORY_INFO} nor a saved dataset; point at a .json/.jsonl "
                "conversation file, a LLaMA-Factory data folder or a `Dataset.save_to_disk` folder."
            )
        return FOLDER_READERS[marker](path, request)
    if path.exists():
        raise DataError(
            f"{path}: unsupported conversation data; use a .json/.jsonl file, a LLaMA-Factory "
            f"{LLAMAFACTORY_INFO} or a folder saved with `Dataset.save_to_disk`."
        )
    raise DataError(f"Conversation data {spec} does not exist; check the data path in the recipe.")


def _read_json(path: Path, request: _Request) -> list[Conversation]:
    doc = _load_json(path)
    if isinstance(doc, dict):  # a data file is a list of records; an object is a LLaMA-Factory registry
        return _read_registry(path, doc, request)
    records, refs = _json_records(path, doc)
    return _convert_all(path, records, refs, path.parent, request, None)


def _read_jsonl(path: Path, request: _Request) -> list[Conversation]:
    records, refs = _jsonl_records(path)
    return _convert_all(path, records, refs, path.parent, request, None)


def _read_llamafactory_folder(folder: Path, request: _Request) -> list[Conversation]:
    info = folder / LLAMAFACTORY_INFO
    doc = _load_json(info)
    if not isinstance(doc, dict):
        raise DataError(
            f"{info} is not a JSON object of dataset entries; write it as LLaMA-Factory does "
            '({"name": {"file_name": ..., "formatting": "sharegpt", ...}}).'
        )
    return _read_registry(info, doc, request)


def _read_saved_dataset(folder: Path, request: _Request) -> list[Conversation]:
    ds = load_saved_dataset(folder, request.split)
    # Arrow rows as Python objects: image columns stay {"bytes", "path"}, so nothing is decoded here.
    rows = ds.with_format("arrow")[:].to_pylist()
    refs = [f"{folder} record {i}" for i in range(len(rows))]
    return _convert_all(folder, rows, refs, folder.parent, request, None, ds.column_names)


# --------------------------------------------------------------------------------- LLaMA-Factory registration


def _read_registry(info: Path, doc: dict, request: _Request) -> list[Conversation]:
    name, entry = _pick_entry(info, doc, request.dataset_name)
    where = f"{info} entry {name!r}"
    _check_entry(where, entry)
    schema = _registry_schema(where, entry, request.columns)
    target = info.parent / str(entry["file_name"])
    files = sorted(p for p in target.iterdir() if p.suffix.lower() in RECORD_LOADERS) if target.is_dir() else [target]
    if not files or not all(p.is_file() for p in files):
        raise DataError(
            f"{where} names file_name {entry['file_name']!r}, which is not a file (or folder of .json/"
            f".jsonl files) next to {info.name}; fix file_name."
        )
    conversations = []
    for file in files:
        loader = RECORD_LOADERS.get(file.suffix.lower())
        if loader is None:
            raise DataError(
                f"{where}: {file.name} is not .json or .jsonl; convert it, as visiontune reads only "
                "those for LLaMA-Factory datasets."
            )
        records, refs = loader(file)
        # LLaMA-Factory resolves media against the dataset_info.json folder (its media_dir default), not the file's.
        conversations += _convert_all(file, records, refs, info.parent, request, schema)
    return conversations


def _pick_entry(info: Path, doc: dict, dataset_name: str | None) -> tuple[str, dict]:
    if dataset_name is None and len(doc) == 1:
        dataset_name = next(iter(doc))
    if dataset_name is None:
        raise DataError(f"{info} registers {len(doc)} datasets {sorted(doc)}; choose one with dataset_name.")
    entry = doc.get(dataset_name)
    if not isinstance(entry, dict):
        raise DataError(f"{info} has no dataset entry {dataset_name!r}; use one of {sorted(doc)}.")
    return dataset_name, entry


def _check_entry(where: str, entry: dict) -> None:
    remote = [
        key for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if key in entry
    ]
    if remote:
        raise DataError(
            f"{where} loads from {remote[0]}, but training reads local files offline; download the data "
            "and register it with file_name."
        )
    if "file_name" not in entry:
        raise DataError(
            f"{where} has no file_name; add the data file's name, relative to the {LLAMAFACTORY_INFO} folder."
        )
    formatting = entry.get("formatting", "alpaca")  # LLaMA-Factory's own default
    if formatting != "sharegpt":
        raise DataError(
            f"{where} has formatting {formatting!r}; visiontune reads LLaMA-Factory's sharegpt "
            "conversations, so convert the data and set formatting to sharegpt."
        )
    if entry.get("ranking"):
        raise DataError(
            f"{where} is a preference (ranking) dataset; supervised fine-tuning needs plain "
            "conversations, so register one without ranking."
        )


def _registry_schema(where: str, entry: dict, columns: dict[str, str] | None) -> _Schema:
    mapped = {**entry.get("columns", {}), **(columns or {})}
    unsupported = sorted(set(mapped) - set(COLUMN_KEYS))
    if unsupported:
        raise DataError(
            f"{where} maps columns {unsupported}, which visiontune's VLM fine-tuning does not read; "
            f"remove them and keep only {list(COLUMN_KEYS)}."
        )
    tags = entry.get("tags", {})
    # Tags left out take LLaMA-Factory's sharegpt defaults (from/value, human/gpt/system).
    roles: dict[str, Role] = {
        tags.get("user_tag", "human"): "user",
        tags.get("assistant_tag", "gpt"): "assistant",
        tags.get("system_tag", "system"): "system",
    }
    return _Schema(
        mapped.get("messages", "conversations"),
        mapped.get("images"),
        mapped.get("system"),
        tags.get("role_tag", "from"),
        tags.get("content_tag", "value"),
        roles,
    )


# ---------------------------------------------------------------------------------------------------- records


def _load_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file.") from None


def _json_records(path: Path, doc: Any = None) -> tuple[list, list[str]]:
    doc = _load_json(path) if doc is None else doc
    if not isinstance(doc, list):
        raise DataError(
            f'{path} is not a JSON list of conversations; write it as [{{"messages": [...], "images": [...]}}, ...].'
        )
    return doc, [f"{path} record {i}" + _id_suffix(r) for i, r in enumerate(doc)]


def _jsonl_records(path: Path) -> tuple[list, list[str]]:
    records, refs = [], []
    # split("\n"), not splitlines(): a JSON string may hold a raw U+2028 or form feed, which splitlines breaks on.
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {n} is not valid JSON ({err.msg}); fix or remove that line.") from None
        refs.append(f"{path} line {n}" + _id_suffix(records[-1]))
    return records, refs


def _id_suffix(record: Any) -> str:
    """LLaVA records carry an `id`: naming it lets the user grep for the record."""
    return f" (id {record['id']})" if isinstance(record, dict) and "id" in record else ""


def _convert_all(
    path: Path,
    records: list,
    refs: list[str],
    default_root: Path,
    request: _Request,
    schema: _Schema | None,
    column_names: Iterable[str] | None = None,
) -> list[Conversation]:
    if not records:
        raise DataError(f"{path} has no records; add conversations to it.")
    present = set(column_names) if column_names is not None else {k for r in records if isinstance(r, dict) for k in r}
    schema = schema or _infer_schema(path, present, request.columns)
    for key in COLUMN_KEYS:
        column = getattr(schema, key)
        if column is not None and column not in present:
            raise DataError(
                f"{path} has no column {column!r} (mapped as {key}); its columns are {sorted(present)}, "
                "so fix the columns mapping."
            )
    root = request.image_root or default_root
    return [_convert(record, schema, root, ref) for record, ref in zip(records, refs, strict=True)]


def _infer_schema(path: Path, present: set[str], columns: dict[str, str] | None) -> _Schema:
    columns = columns or {}
    messages = columns.get("messages") or next((c for c in ("messages", "conversations") if c in present), None)
    if messages is None:
        raise DataError(
            f"{path} has neither a `messages` nor a `conversations` column (its columns are "
            f"{sorted(present)}); rename one or pass columns={{'messages': ...}}."
        )
    images = columns.get("images") or next((c for c in ("images", "image") if c in present), None)
    system = columns.get("system") or ("system" if "system" in present else None)
    return _Schema(messages, images, system)


def _convert(record: Any, schema: _Schema, root: Path, ref: str) -> Conversation:
    try:
        if not isinstance(record, dict):
            raise _Bad(f'is {_kind(record)}, not an object (write each record as {{"{schema.messages}": [...], ...}})')
        turns, inline = _turns(record, schema)
        images = _image_list(record.get(schema.images) if schema.images else None, schema.images or "images", root)
        if inline and images:
            raise _Bad("gives images both inside its messages and in its images column (keep one of the two)")
        return Conversation(turns, images or [_image_source(v, "an image part", root) for v in inline], ref)
    except _Bad as bad:
        return Conversation([], [], ref, str(bad))


def _turns(record: dict, schema: _Schema) -> tuple[list[Turn], list]:
    messages = record.get(schema.messages)
    if not isinstance(messages, list):
        raise _Bad(f"has no `{schema.messages}` list (add the conversation, or map its column with columns)")
    turns, inline = [], []
    for k, message in enumerate(messages):
        where = f"{schema.messages}[{k}]"
        role_tag, content_tag = _tags(message, schema, where)
        role = schema.roles.get(message[role_tag]) if isinstance(message[role_tag], str) else None
        if role is None:
            raise _Bad(f"{where} has unknown role {message[role_tag]!r} (use one of {sorted(schema.roles)})")
        text, images = _content_text(message[content_tag], where)
        turns.append(Turn(role, text))
        inline += images
    system = record.get(schema.system) if schema.system else None
    # A system turn in the messages wins over the column, as in LLaMA-Factory.
    if system not in (None, "") and not (turns and turns[0].role == "system"):
        if not isinstance(system, str):
            raise _Bad(f"has {_kind(system)} in `{schema.system}` (write the system prompt as a string)")
        turns.insert(0, Turn("system", system))
    return turns, inline


def _tags(message: Any, schema: _Schema, where: str) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise _Bad(f'{where} is {_kind(message)}, not an object (write each turn as {{"role": ..., "content": ...}})')
    role_tag, content_tag = schema.role_tag, schema.content_tag
    if role_tag is None:
        role_tag, content_tag = ("role", "content") if "role" in message else ("from", "value")
    for tag in (role_tag, content_tag):
        if tag not in message:
            raise _Bad(f"{where} has no `{tag}` key (give every turn `{role_tag}` and `{content_tag}`)")
    return role_tag, content_tag


def _content_text(content: Any, where: str) -> tuple[str, list]:
    """Text with `<image>` placeholders, and any images given inline in image parts."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _Bad(
            f"{where} content is {_kind(content)}, not text (write it as a string or a list of text/image parts)"
        )
    pieces, inline = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_TOKEN)
            given = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
            inline += [] if given is None else [given]
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "text":
            raise _Bad(f"{where} has a text part whose text is {_kind(part.get('text'))} (write it as a string)")
        else:
            raise _Bad(
                f'{where} has a part of type {kind!r} (use only {{"type": "text"}} and {{"type": "image"}} parts)'
            )
    return "".join(pieces), inline


def _image_list(value: Any, column: str, root: Path) -> list[ImageSource]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]  # LLaVA's `image` is one path
    return [_image_source(v, f"{column}[{k}]", root) for k, v in enumerate(items)]


def _image_source(value: Any, where: str, root: Path) -> ImageSource:
    if isinstance(value, dict):  # datasets.Image storage
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | Image.Image):
        return value
    if isinstance(value, str) and value.strip():
        if _URL.match(value):
            raise _Bad(
                f"{where} is a URL ({value}), but images must be local files for offline training (download "
                "them and give their paths)"
            )
        return (root / value).resolve()  # an absolute path stays as it is
    raise _Bad(f"{where} is {value!r}, not an image (give a file path relative to {root})")


# ---------------------------------------------------------------------------------------------------- checks


def conversation_problem(conv: Conversation) -> str | None:
    """The first structural problem of a conversation (with its fix in brackets), or None."""
    if conv.problem:
        return conv.problem
    turns = conv.turns[1:] if conv.turns and conv.turns[0].role == "system" else conv.turns
    offset = len(conv.turns) - len(turns) + 1  # turns are numbered from 1, counting a system turn
    for k, turn in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if turn.role != expected:
            return (
                f"has turn {k + offset} from {turn.role} where {expected} should come (after an optional system "
                "turn, user and assistant must alternate, starting with user)"
            )
        if turn.role == "assistant" and not turn.text.strip():
            return f"has an empty assistant turn {k + offset} (write the answer or remove the turn)"
    if not any(t.role == "assistant" for t in turns):
        return "has no assistant turn (add the answer to train on)"
    if turns[-1].role == "user":
        return f"ends with user turn {len(conv.turns)} that has no answer (add the answer or remove that turn)"
    placeholders = sum(t.text.count(IMAGE_TOKEN) for t in conv.turns)
    if placeholders != len(conv.images):
        return (
            f"has {placeholders} {IMAGE_TOKEN} placeholder(s) but {len(conv.images)} image(s) (put one "
            f"{IMAGE_TOKEN} in the text for each image, in order)"
        )
    return None


def check_conversations(
    convs: list[Conversation],
    on_bad_sample: Literal["error", "skip"] = "error",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
) -> tuple[list[Conversation], list[tuple[str, str]]]:
    """Check every structural rule and every image (once, decoded as training will) of `convs`. With "error", raise
    one DataError naming the count and the first bad records; with "skip", return (kept, [(ref, reason)])."""
    kept, bad = check_conversation_splits({"": convs}, on_bad_sample, max_pixels, workers)
    return kept[""], bad


def check_conversation_splits(
    splits: dict[str, list[Conversation]],
    on_bad_sample: Literal["error", "skip"] = "error",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
) -> tuple[dict[str, list[Conversation]], list[tuple[str, str]]]:
    """`check_conversations` over several splits (e.g. {"train": ..., "val": ...}) at once: one error lists the bad
    records of all of them (the first few, a count, and a report file with every one), and an image shared across
    splits is checked once. With "skip", returns the kept conversations per split and every (ref, reason)."""
    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"on_bad_sample is {on_bad_sample!r}; use error or skip.")
    for role, convs in splits.items():
        if not convs:
            raise DataError(
                f"There are no {role + ' ' if role else ''}conversations to check; point the data path at a file "
                "with conversations."
            )
    everything = [c for convs in splits.values() for c in convs]
    reasons = _reasons(everything, max_pixels, workers)
    found = {role: [(c.ref, reasons[id(c)]) for c in convs if reasons[id(c)]] for role, convs in splits.items()}
    bad = [entry for entries in found.values() for entry in entries]
    if bad and on_bad_sample == "error":
        tag = {role: f" ({role})" if len(splits) > 1 else "" for role in splits}
        entries = [f"{ref}{tag[role]} {reason}" for role, records in found.items() for ref, reason in records]
        what = bad_count("conversation", {role: len(records) for role, records in found.items()})
        raise bad_records_error(entries, what, "conversation")
    return {role: _kept(role, convs, reasons) for role, convs in splits.items()}, bad


def _reasons(convs: list[Conversation], max_pixels: int, workers: int) -> dict[int, str | None]:
    """Each conversation's first problem, structural before image, keyed by id()."""
    reasons = {id(c): conversation_problem(c) for c in convs}
    image_reasons = _image_problems([c for c in convs if reasons[id(c)] is None], max_pixels, workers)
    for conv in convs:
        if reasons[id(conv)] is None:
            reasons[id(conv)] = next((image_reasons[_key(s)] for s in conv.images if _key(s) in image_reasons), None)
    return reasons


def _kept(role: str, convs: list[Conversation], reasons: dict[int, str | None]) -> list[Conversation]:
    kept = [c for c in convs if reasons[id(c)] is None]
    if not kept:
        first = next(c for c in convs if reasons[id(c)])
        raise DataError(
            f"Every one of the {len(convs)} {role + ' ' if role else ''}conversations is bad (first: {first.ref} "
            f"{reasons[id(first)]}); fix the data."
        )
    return kept


def _image_problems(convs: list[Conversation], max_pixels: int, workers: int) -> dict[Any, str]:
    """Reason per unusable image, keyed by `_key`; an image shared by many conversations is checked once."""
    unique = {_key(s): s for conv in convs for s in conv.images}

    def probe(source: ImageSource) -> str | None:
        try:
            if isinstance(source, Path):
                check_image(source, max_pixels)
            else:
                open_image(source, max_pixels)  # in-memory images have no header-only check; decoding one is cheap
        except BadImage as err:
            fix = "fix the path or the image root" if str(err) == "file not found" else "replace or remove it"
            return f"{_image_reason(source, err)} ({fix})"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # I/O bound: threads overlap file reads
        found = dict(zip(unique, pool.map(probe, unique.values()), strict=True))
    return {key: reason for key, reason in found.items() if reason is not None}


def _image_reason(source: ImageSource, err: BadImage) -> str:
    """The clause `has image PATH that is corrupt ...`, naming the image (an in-memory one by its type)."""
    name = source if isinstance(source, Path) else f"({type(source).__name__})"
    return f"has image {name} that {_verb(err)}"


def _verb(err: BadImage) -> str:
    """BadImage reasons read after the image's name ("file not found", "is corrupt ..."); make them a clause."""
    reason = str(err)
    return "is not found" if reason == "file not found" else reason


def _key(source: ImageSource) -> Any:
    return str(source) if isinstance(source, Path) else id(source)


# ---------------------------------------------------------------------------------------------- the same image


def identify_conversations(*sets: list[Conversation]) -> list[list[tuple[str, ...]]]:
    """Per conversation, the keys that make two records "the same": one per image (core.identity: the same content)
    and a last one for the whole record (turns and images), so that text-only copies are found too. Computed over
    all sets at once, so that keys compare across them, and kept on each conversation (`keys`)."""
    if any(c.keys is None for convs in sets for c in convs):
        flat = iter(image_keys([source for convs in sets for c in convs for source in c.images]))
        for conv in (c for convs in sets for c in convs):
            images = tuple(next(flat) for _ in conv.images)
            record = json.dumps([[[t.role, t.text] for t in conv.turns], images])
            conv.keys = (*images, "record:" + memory_digest(record.encode()))
    return [[c.keys or () for c in convs] for convs in sets]


def conversation_groups(convs: list[Conversation]) -> list[list[int]]:
    """Conversation indices joined when they share an image or are the same record (a union-find over keys), groups
    in order of their first conversation: what a split must keep on one side."""
    (keys,) = identify_conversations(convs)
    parent = list(range(len(convs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, record in enumerate(keys):
        for key in record:
            a, b = root(i), root(first.setdefault(key, i))
            parent[max(a, b)] = min(a, b)
    return groups([root(i) for i in range(len(convs))])


def refuse_conversation_leak(train: list[Conversation], val: list[Conversation]) -> None:
    """Refuse validation conversations that share an image (or the whole record) with a training conversation."""
    train_keys, val_keys = identify_conversations(train, val)
    refuse_shared(train_keys, val_keys, lambda i: train[i].ref, lambda i: val[i].ref, "an image or the whole record")


def conversation_duplicates(convs: list[Conversation]) -> int:
    """Conversations that repeat an earlier one of the set: the same turns with the same images."""
    (keys,) = identify_conversations(convs)
    return duplicates([record[-1] for record in keys])


# ---------------------------------------------------------------------------------------------------- output


def to_messages(conv: Conversation) -> list[dict]:
    """HF/TRL chat messages: each turn's content is a list of parts, `{"type": "image"}` where the `<image>`
    placeholders were (the images themselves go to the processor in `conv.images` order)."""
    if conv.problem:
        raise DataError(f"{conv.ref} {conv.problem}.")
    return [{"role": turn.role, "content": _parts(turn.text)} for turn in conv.turns]


def _parts(text: str) -> list[dict]:
    if IMAGE_TOKEN not in text:
        return [{"type": "text", "text": text}]
    parts: list[dict] = []
    for k, segment in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            parts.append({"type": "image"})
        # Chat templates put their own separators around image tokens; LLaVA's "<image>\n" would double them.
        if segment.strip():
            parts.append({"type": "text", "text": segment.strip()})
    return parts


def load_images(conv: Conversation, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """Decode a conversation's images to RGB, in placeholder order. A bad one is a SampleError naming the record and
    the image: the collator decodes in DataLoader workers, through which it stays one sentence."""
    images = []
    for source in conv.images:
        try:
            images.append(open_image(source, max_pixels))
        except BadImage as err:
            hint = "fix or remove it (data.on_bad_sample=skip drops bad conversations)"
            raise SampleError(f"{conv.ref} {_image_reason(source, err)}; {hint}.") from None
    return images


FILE_READERS: dict[str, Callable[[Path, _Request], list[Conversation]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
}
# Checked in order: a saved dataset holds a dataset_info.json too (HF's own), so its other markers come first.
FOLDER_READERS: dict[str, Callable[[Path, _Request], list[Conversation]]] = {
    "dataset_dict.json": _read_saved_dataset,
    "state.json": _read_saved_dataset,
    LLAMAFACTORY_INFO: _read_llamafactory_folder,
}
RECORD_LOADERS: dict[str, Callable[[Path], tuple[list, list[str]]]] = {
    ".json": _json_records,
    ".jsonl": _jsonl_records,
}


def _kind(value: Any) -> str:
    """A wrong value's type in JSON words ("a number", "null"), as the user wrote it in the file."""
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")
