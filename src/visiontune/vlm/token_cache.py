"""The tokenisation cache of the VLM tasks: tokenise once, reuse on the next run of the same records and settings.

One safetensors file per key: flat token tensors plus JSON metadata (record indexes, bad records). No pickle, so
loading a cache file never runs code. Files are written under a unique temporary name and renamed into place, by
one process per machine; the others wait for the file (torch.distributed is not initialised yet at this point).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from visiontune.core.errors import DataError
from visiontune.run.distributed import launched_world_size
from visiontune.vlm.conversations import Conversation
from visiontune.vlm.tokenize import CACHE_FORMAT, BadRecord, Tokenized, cache_key, tokenize

log = logging.getLogger(__name__)
WAIT_SECONDS = 1800.0  # how long a non-writing rank waits for the writer's file before tokenising itself
POLL_SECONDS = 1.0
Bad = list[tuple[int, str]]  # (index into convs, reason): refs are rebuilt from the caller's records


def tokenize_cached(
    processor: Any,
    convs: list[Conversation],
    model_key: str,
    *,
    max_length: int,
    max_image_pixels: int,
    train_on: str,
    on_bad_sample: str,
    cache: bool = True,
) -> tuple[list[Tokenized], list[tuple[str, str]]]:
    """Tokenise every record with assistant-only labels, or load the cached result for these exact records.

    `max_length`, `max_image_pixels` and `train_on` go to `tokenize`; `on_bad_sample` (error / skip) says what a
    record that does not fit does; `cache` off tokenises without reading or writing the cache. The cache key
    covers all four settings, the records, the processor and `model_key`.
    Returns the tokenised records (`index` into `convs`) and the skipped ones as (ref, reason)."""
    settings = {
        "max_length": max_length,
        "max_image_pixels": max_image_pixels,
        "train_on": train_on,
        "on_bad_sample": on_bad_sample,
    }
    if not cache:
        tokens, bad = _tokenize_all(processor, convs, settings)
    else:
        key = cache_key(model_key, processor, convs, settings)
        path = _cache_dir() / f"{key}.safetensors"
        cached = _load(path, key, convs) if _is_writer() else _wait_for(path, key, convs)
        if cached is None:
            tokens, bad = _tokenize_all(processor, convs, settings)
            if _is_writer():
                _save(path, key, len(convs), tokens, bad)
        else:
            tokens, bad = cached
    if bad and on_bad_sample == "error":  # a cache from a skip run must not hide them
        raise _bad_record_error(convs[bad[0][0]].ref, bad[0][1])
    return tokens, [(convs[i].ref, reason) for i, reason in bad]


def _tokenize_all(processor: Any, convs: list[Conversation], settings: dict[str, Any]) -> tuple[list[Tokenized], Bad]:
    """Tokenise with exactly the `settings` the cache key was made from."""
    tokens: list[Tokenized] = []
    bad: Bad = []
    limits = (settings["max_length"], settings["max_image_pixels"], settings["train_on"])
    for i, conv in enumerate(convs):
        try:
            record = tokenize(processor, conv, *limits)
        except BadRecord as err:
            if settings["on_bad_sample"] == "error":
                raise _bad_record_error(conv.ref, str(err)) from None
            bad.append((i, str(err)))
            continue
        record.index = i
        tokens.append(record)
    return tokens, bad


def _bad_record_error(ref: str, reason: str) -> DataError:
    return DataError(f"{ref} {reason}; or set data.on_bad_sample=skip to leave it out.")


# --------------------------------------------------------------------------------------------------- ranks


def _is_writer() -> bool:
    """A single process, or the first process on each machine (so a node-local cache folder gets its file on every
    node; on a shared folder several writers rename identical files into place, which is harmless)."""
    if launched_world_size() <= 1:
        return True
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0


def _wait_for(path: Path, key: str, convs: list[Conversation]) -> tuple[list[Tokenized], Bad] | None:
    """Poll for the writer's file; None (tokenise here) after WAIT_SECONDS or when the folder is not writable,
    since then the writer cannot produce it either."""
    if not _writable(path.parent):
        return None
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        if path.is_file():
            try:
                return _read(path, key, convs)
            except Exception:  # still being replaced, or a stale broken file the writer is about to overwrite
                pass
        if time.monotonic() >= deadline:
            log.warning("Tokenisation cache %s did not appear within %.0f s; tokenising here.", path, WAIT_SECONDS)
            return None
        time.sleep(POLL_SECONDS)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


# --------------------------------------------------------------------------------------------- reading/writing


def _load(path: Path, key: str, convs: list[Conversation]) -> tuple[list[Tokenized], Bad] | None:
    if not path.is_file():
        return None
    try:
        return _read(path, key, convs)
    except Exception as err:  # any unreadable, truncated or foreign file just means "tokenise again"
        log.warning("Ignoring unreadable tokenisation cache %s (%s); tokenising again.", path, type(err).__name__)
        return None


def _read(path: Path, key: str, convs: list[Conversation]) -> tuple[list[Tokenized], Bad]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key or int(meta["records"]) != len(convs):
        raise ValueError("written for other records or by another version")
    index, lengths = tensors["index"].tolist(), tensors["length"].tolist()
    cut, lost = tensors["cut"].tolist(), tensors["lost"].tolist()  # truncation, counted again on every run
    bad = [(int(i), str(reason)) for i, reason in json.loads(meta["bad"])]
    if any(not 0 <= i < len(convs) for i in index + [i for i, _ in bad]) or len(lengths) != len(index):
        raise ValueError("record indexes out of range")
    ids, labels = _split(tensors["input_ids"].tolist(), lengths), _split(tensors["labels"].tolist(), lengths)
    extras: list[dict[str, Any]] = [{} for _ in index]
    for name, kind in json.loads(meta["extra"]).items():
        for row, value in _unpack_extra(tensors, name, kind):
            extras[row][name] = value
    tokens = [
        Tokenized(i_ids, i_labels, extra, convs[i].ref, i, n_cut, n_lost)
        for i_ids, i_labels, extra, i, n_cut, n_lost in zip(ids, labels, extras, index, cut, lost, strict=True)
    ]
    return tokens, bad


def _split(flat: list[int], lengths: list[int]) -> list[list[int]]:
    if sum(lengths) != len(flat) or min(lengths, default=0) < 0:
        raise ValueError("token lengths do not match the stored tokens")
    out, start = [], 0
    for n in lengths:
        out.append(flat[start : start + n])
        start += n
    return out


def _unpack_extra(tensors: dict[str, torch.Tensor], name: str, kind: str) -> list[tuple[int, Any]]:
    flat, rows = tensors[f"extra/{name}"], tensors[f"extra/{name}/rows"].tolist()
    shapes = tensors[f"extra/{name}/shape"].tolist()
    sizes = [math.prod(shape) for shape in shapes]
    if kind == "list":
        return list(zip(rows, _split(flat.tolist(), sizes), strict=True))
    return [(r, part.reshape(s).clone()) for r, part, s in zip(rows, flat.split(sizes), shapes, strict=True)]


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _save(path: Path, key: str, n_records: int, tokens: list[Tokenized], bad: Bad) -> None:
    """Write under a unique temporary name in the same folder, then rename: readers never see a partial file and
    concurrent writers never share one. (Not mkstemp: its 0600 mode would hide a shared cache from other users.)"""
    tensors, kinds = _pack(tokens)
    meta = {"format": CACHE_FORMAT, "key": key, "records": str(n_records), "extra": json.dumps(kinds)}
    meta["bad"] = json.dumps(bad)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600, which would hide a shared cache from others
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # the cache only saves time: a full or read-only disk must not stop
        log.warning("Cannot write the tokenisation cache %s (%s); continuing without it.", path, err)
    finally:
        tmp.unlink(missing_ok=True)


def _pack(tokens: list[Tokenized]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat tensors (int32 token ids: every vocabulary fits) plus, per extra key, its rows and shapes."""
    tensors = {
        "index": torch.tensor([r.index for r in tokens], dtype=torch.int64),
        "length": torch.tensor([len(r.input_ids) for r in tokens], dtype=torch.int64),
        "cut": torch.tensor([r.cut for r in tokens], dtype=torch.int64),
        "lost": torch.tensor([r.lost for r in tokens], dtype=torch.int64),
        "input_ids": torch.tensor([t for r in tokens for t in r.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for r in tokens for t in r.labels], dtype=torch.int32),
    }
    kinds: dict[str, str] = {}
    for record in tokens:
        for name, value in record.extra.items():
            kinds.setdefault(name, "list" if isinstance(value, list) else "tensor")
    for name in kinds:
        rows = [row for row, record in enumerate(tokens) if name in record.extra]
        values = [torch.as_tensor(tokens[row].extra[name]) for row in rows]
        flat = torch.cat([v.reshape(-1) for v in values])
        tensors[f"extra/{name}"] = _narrow(flat) if kinds[name] == "list" else flat.contiguous()
        tensors[f"extra/{name}/rows"] = torch.tensor(rows, dtype=torch.int64)
        tensors[f"extra/{name}/shape"] = torch.tensor([list(v.shape) for v in values], dtype=torch.int64)
    return tensors, kinds


def _narrow(flat: torch.Tensor) -> torch.Tensor:
    """Token-aligned lists (mm_token_type_ids) hold small ints: store them in the smallest type that holds them all,
    as they come back as Python ints either way."""
    if flat.dtype != torch.int64 or flat.numel() == 0:
        return flat.contiguous()
    low, high = int(flat.min()), int(flat.max())
    for dtype in (torch.int8, torch.int16, torch.int32):
        if torch.iinfo(dtype).min <= low and high <= torch.iinfo(dtype).max:
            return flat.to(dtype)
    return flat.contiguous()


def _cache_dir() -> Path:
    return Path(os.environ.get("VISIONTUNE_CACHE", Path.home() / ".cache" / "visiontune")) / "tokenized"
