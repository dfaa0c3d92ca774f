"""The tokenisation cache of the VLM tasks: tokenise once, reuse on the next run of the same data and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visiontune.core.errors import DataError
from visiontune.vlm.conversations import Conversation
from visiontune.vlm.tokenize import BadRecord, Tokenized, cache_key, tokenize


def tokenize_cached(d: Any, processor: Any, convs: list[Conversation], model_key: str) -> tuple[list[Tokenized], list]:
    """Tokenise every record with assistant-only labels, or load the cached result of an identical earlier run.

    `d` is the recipe's `data` section (max_length, max_image_pixels, train_on, on_bad_sample, cache, train)."""
    settings = {
        "max_length": d.max_length,
        "max_pixels": d.max_image_pixels,
        "train_on": d.train_on,
        "template": processor.chat_template,
        "n": len(convs),
        "refs": [c.ref for c in convs[:3]],
        "image_tokens": getattr(processor, "num_image_tokens", None),
    }
    key = cache_key(model_key, [Path(d.train)], settings)
    cache = _cache_dir() / f"{key}.pt"
    if d.cache and cache.is_file():
        cached = torch.load(cache, weights_only=False)
        return cached["tokens"], cached["bad"]
    tokens, bad = [], []
    for i, conv in enumerate(convs):
        try:
            record = tokenize(processor, conv, d.max_length, d.max_image_pixels, d.train_on)
        except BadRecord as err:
            if d.on_bad_sample == "error":
                raise DataError(f"{conv.ref} {err}; or set data.on_bad_sample=skip to leave it out.") from None
            bad.append((conv.ref, str(err)))
            continue
        record.index = i
        tokens.append(record)
    if d.cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"tokens": tokens, "bad": bad}, tmp)
        tmp.replace(cache)  # atomic: a killed run never leaves a half-written cache
    return tokens, bad


def _cache_dir() -> Path:
    import os

    return Path(os.environ.get("VISIONTUNE_CACHE", Path.home() / ".cache" / "visiontune")) / "tokenized"
