"""Preference pairs for `task: vlm_preference`: readers of the formats people have, normalised into two
`Conversation`s per pair (the same prompt and images, then the chosen or the rejected answer), and the pair checks.

Formats, decided per record (a file may mix them), or by a LLaMA-Factory registration:
- TRL explicit prompt: `prompt`, `chosen`, `rejected` (+ `images` / `image`). Conversational: `prompt` is a list of
  messages and each answer a list holding one assistant message; plain: three strings (an image without an `<image>`
  placeholder in the prompt goes before the prompt's text, as TRL's processors do).
- TRL implicit prompt: `chosen` and `rejected` are whole conversations sharing every turn but the last.
- Conversations with two answers: `messages` / `conversations` ending with the user's turn, plus `chosen` and
  `rejected` (a string or one message) — LLaMA-Factory's ShareGPT ranking shape.
- LLaMA-Factory Alpaca ranking: `instruction` (+ `input`, `system`, `history`), `chosen`, `rejected`, `images`.
- A LLaMA-Factory `dataset_info.json` (or its folder) whose entry has `ranking: true`, `formatting` sharegpt or
  alpaca, and its `columns` / `tags`.

Bad pairs (identical answers, an empty answer, a missing image, a prompt not ending with the user) keep their reason
on the chosen conversation, so the SFT checks (`check_conversation_splits`, `data.on_bad_sample`) name or skip them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune.core.errors import DataError
from visiontune.vlm.conversations import (
    IMAGE_TOKEN,
    LLAMAFACTORY_INFO,
    RECORD_LOADERS,
    Conversation,
    Role,
    _Bad,
    _check_entry,
    _convert,
    _jsonl_records,
    _load_json,
    _pick_entry,
    _Schema,
    conversation_problem,
)


@dataclass
class PreferencePair:
    chosen: Conversation  # prompt turns + the chosen answer; carries the pair's problem, if any
    rejected: Conversation  # the same prompt turns and images + the rejected answer

    @property
    def ref(self) -> str:
        return self.chosen.ref


_SHAREGPT_COLUMNS = ("messages", "chosen", "rejected", "images", "system")
_ALPACA_COLUMNS = ("prompt", "query", "chosen", "rejected", "images", "system", "history")
_ALPACA_DEFAULTS = {"prompt": "instruction", "query": "input", "history": "history"}


def read_preferences(
    spec: str | Path, image_root: str | Path | None = None, dataset_name: str | None = None
) -> list[PreferencePair]:
    """Read preference pairs from a .json / .jsonl file, a LLaMA-Factory `dataset_info.json` or its folder."""
    path = Path(spec).expanduser()
    root = Path(image_root).expanduser().resolve() if image_root else None
    if path.is_dir() and (path / LLAMAFACTORY_INFO).is_file():
        path = path / LLAMAFACTORY_INFO
    if not path.exists():
        raise DataError(f"Preference data {spec} does not exist; check data.train / data.val in the recipe.")
    if path.suffix.lower() not in RECORD_LOADERS:
        raise DataError(
            f"{path}: unsupported preference data; use a .json/.jsonl file of pairs or a LLaMA-Factory "
            f"{LLAMAFACTORY_INFO} with a `ranking: true` entry."
        )
    if path.suffix.lower() == ".json":
        doc = _load_json(path)
        if isinstance(doc, dict):
            return _read_registry(path, doc, root, dataset_name)
        if not isinstance(doc, list):
            raise DataError(f"{path} is not a JSON list of preference pairs; write it as a list of records.")
        records, refs = doc, [f"{path} record {i}" for i in range(len(doc))]
    else:
        records, refs = _jsonl_records(path)
    return _pairs(path, records, refs, root or path.parent, None)


def _read_registry(info: Path, doc: dict, root: Path | None, dataset_name: str | None) -> list[PreferencePair]:
    name, entry = _pick_entry(info, doc, dataset_name)
    where = f"{info} entry {name!r}"
    if not entry.get("ranking"):
        raise DataError(
            f'{where} is not a preference dataset; mark it `"ranking": true` with chosen/rejected columns, or '
            "train on it with task: vlm_sft."
        )
    formatting = entry.get("formatting", "alpaca")
    _check_entry(where, {**entry, "formatting": "sharegpt", "ranking": False})  # remote sources, file_name
    if formatting not in ("sharegpt", "alpaca"):
        raise DataError(f"{where} has formatting {formatting!r}; use sharegpt or alpaca.")
    target = info.parent / str(entry["file_name"])
    files = sorted(p for p in target.iterdir() if p.suffix.lower() in RECORD_LOADERS) if target.is_dir() else [target]
    if not files or not all(p.is_file() and p.suffix.lower() in RECORD_LOADERS for p in files):
        raise DataError(
            f"{where} names file_name {entry['file_name']!r}, which is not a .json/.jsonl file (or a folder of "
            f"them) next to {info.name}; fix file_name."
        )
    layout = _Layout.from_entry(where, entry, formatting)
    pairs: list[PreferencePair] = []
    for file in files:
        records, refs = RECORD_LOADERS[file.suffix.lower()](file)
        pairs += _pairs(file, records, refs, root or info.parent, layout)  # media resolve against the registry
    return pairs


@dataclass
class _Layout:
    """A LLaMA-Factory registration: its format, column names and ShareGPT tags."""

    formatting: str
    columns: dict[str, str]
    schema: _Schema

    @classmethod
    def from_entry(cls, where: str, entry: dict, formatting: str) -> _Layout:
        allowed = _SHAREGPT_COLUMNS if formatting == "sharegpt" else _ALPACA_COLUMNS
        columns = dict(entry.get("columns", {}))
        unknown = sorted(set(columns) - set(allowed))
        if unknown:
            raise DataError(f"{where} maps columns {unknown}, which a {formatting} ranking set has not; use {allowed}.")
        tags = entry.get("tags", {})
        roles: dict[str, Role] = {
            tags.get("user_tag", "human"): "user",
            tags.get("assistant_tag", "gpt"): "assistant",
            tags.get("system_tag", "system"): "system",
        }
        role_tag, content_tag = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        schema = _Schema("messages", "images", "system", role_tag, content_tag, roles)
        return cls(formatting, columns, schema)

    def column(self, key: str) -> str:
        return self.columns.get(key, _ALPACA_DEFAULTS.get(key, "conversations" if key == "messages" else key))


def _pairs(path: Path, records: list, refs: list[str], root: Path, layout: _Layout | None) -> list[PreferencePair]:
    if not records:
        raise DataError(f"{path} has no records; add preference pairs to it.")
    return [_pair(record, ref, root, layout) for record, ref in zip(records, refs, strict=True)]


def _pair(record: Any, ref: str, root: Path, layout: _Layout | None) -> PreferencePair:
    try:
        if not isinstance(record, dict):
            raise _Bad('is not an object (write each pair as {"prompt": ..., "chosen": ..., "rejected": ...})')
        prompt, chosen, rejected, schema = _normalise(record, layout)
    except _Bad as bad:
        empty = Conversation([], [], ref, str(bad))
        return PreferencePair(empty, Conversation([], [], ref, str(bad)))
    conv = {k: v for k, v in prompt.items() if k != "messages"}
    pair = PreferencePair(
        _convert({**conv, "messages": [*prompt["messages"], chosen]}, schema, root, ref),
        _convert({**conv, "messages": [*prompt["messages"], rejected]}, schema, root, ref),
    )
    pair.chosen.problem = pair_problem(pair)
    return pair


_AUTO = _Schema("messages", "images", "system")  # role/content or from/value, every format's role names


def _normalise(record: dict, layout: _Layout | None) -> tuple[dict, Any, Any, _Schema]:
    """(prompt record {"messages", "images", "system"}, chosen message, rejected message, schema to read them)."""
    if layout is not None and layout.formatting == "alpaca":
        return _alpaca(record, layout.column, layout.schema)
    if layout is not None:
        c = layout.column
        images = record.get(c("images"))
        prompt = {"messages": _list(record, c("messages")), "images": images, "system": record.get(c("system"))}
        return prompt, *_answers(record, c("chosen"), c("rejected"), layout.schema), layout.schema
    images = next((record[k] for k in ("images", "image") if k in record), None)
    system = record.get("system")
    if "prompt" in record:  # TRL explicit prompt
        messages = _prompt_messages(record["prompt"], images)
        return {"messages": messages, "images": images, "system": system}, *_answers(record), _AUTO
    if "messages" in record or "conversations" in record:  # conversations with two answers
        key = "messages" if "messages" in record else "conversations"
        prompt = {"messages": _list(record, key), "images": images, "system": system}
        return prompt, *_answers(record), _AUTO
    if "instruction" in record:
        return _alpaca(record, lambda k: _ALPACA_DEFAULTS.get(k, k), _AUTO)
    if "chosen" in record and "rejected" in record:  # TRL implicit prompt: two whole conversations
        chosen, rejected = _list(record, "chosen"), _list(record, "rejected")
        if not chosen or chosen[:-1] != rejected[:-1]:
            raise _Bad("has chosen and rejected conversations that differ before their last turn (give `prompt`)")
        return {"messages": chosen[:-1], "images": images, "system": system}, chosen[-1], rejected[-1], _AUTO
    raise _Bad(
        f"has none of prompt / messages / conversations / instruction (its keys are {sorted(record)}); write "
        "TRL's prompt/chosen/rejected or a conversation with chosen and rejected answers"
    )


def _alpaca(record: dict, column: Any, schema: _Schema) -> tuple[dict, Any, Any, _Schema]:
    """LLaMA-Factory's Alpaca ranking: instruction + input as the question, history as earlier turns."""
    user, assistant = _role_name(schema, "user"), _role_name(schema, "assistant")
    text = "\n".join(str(record[k]) for k in (column("prompt"), column("query")) if record.get(k))
    messages = []
    for k, turn in enumerate(record.get(column("history")) or []):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise _Bad(f"has history[{k}] that is not a [question, answer] pair")
        messages += [_message(schema, user, turn[0]), _message(schema, assistant, turn[1])]
    messages.append(_message(schema, user, text))
    prompt = {"messages": messages, "images": record.get(column("images")), "system": record.get(column("system"))}
    return prompt, *_answers(record, column("chosen"), column("rejected"), schema), schema


def _answers(
    record: dict, chosen: str = "chosen", rejected: str = "rejected", schema: _Schema = _AUTO
) -> tuple[Any, Any]:
    return _answer(record, chosen, schema), _answer(record, rejected, schema)


def _answer(record: dict, key: str, schema: _Schema) -> Any:
    """One assistant message from a string, a message, or a list holding one message."""
    if key not in record:
        raise _Bad(f"has no `{key}` answer (give both chosen and rejected)")
    value = record[key]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]
    if value is None or isinstance(value, str):
        return _message(schema, _role_name(schema, "assistant"), value or "")
    if isinstance(value, dict):
        return value
    raise _Bad(f"has a `{key}` answer that is neither text nor one assistant message")


def _prompt_messages(prompt: Any, images: Any) -> list:
    if isinstance(prompt, list):
        return prompt
    if not isinstance(prompt, str):
        raise _Bad("has a `prompt` that is neither text nor a list of messages")
    n = len(images) if isinstance(images, list) else int(images is not None)
    missing = max(0, n - prompt.count(IMAGE_TOKEN))
    return [{"role": "user", "content": IMAGE_TOKEN * missing + prompt}]


def _list(record: dict, key: str) -> list:
    value = record.get(key)
    if not isinstance(value, list):
        raise _Bad(f"has no `{key}` list of messages")
    return value


def _role_name(schema: _Schema, role: Role) -> str:
    return next((name for name, r in schema.roles.items() if r == role), role)


def _message(schema: _Schema, role: str, text: Any) -> dict:
    return {schema.role_tag or "role": role, schema.content_tag or "content": text}


# ---------------------------------------------------------------------------------------------------- checks


def pair_problem(pair: PreferencePair) -> str | None:
    """The first problem of a pair (with its fix in brackets): either conversation's, a prompt not ending with the
    user's turn, an empty answer, or the same answer twice."""
    if pair.chosen.problem:  # the reader's
        return pair.chosen.problem
    if len(pair.chosen.turns) < 2 or pair.chosen.turns[-2].role != "user":
        return "has a prompt that does not end with the user's turn (the answers must reply to it)"
    problem = conversation_problem(pair.chosen)
    if problem:
        return problem if "empty assistant" not in problem else "has an empty chosen answer (write it or drop the pair)"
    rejected = conversation_problem(pair.rejected)
    if rejected:
        return "has an empty rejected answer (write it or drop the pair)" if "empty assistant" in rejected else rejected
    if pair.chosen.turns[-1].text.strip() == pair.rejected.turns[-1].text.strip():
        return "has the same chosen and rejected answer (a pair must differ to teach a preference; fix or drop it)"
    return None
