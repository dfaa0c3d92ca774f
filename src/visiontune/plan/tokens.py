"""A VLM recipe's tokens: per record (image tokens at the recipe's `data.max_image_pixels` included, as the
tokenised records hold them), truncation, and the padding a batch carries with and without length grouping."""

from __future__ import annotations

import math
from typing import Any

import torch

BINS = 8


def image_token_id(processor: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id if isinstance(token_id, int) else None


def histogram(lengths: list[int]) -> dict[str, list[int]]:
    """Counts of records per length bin; `edges[i]` is bin i's first length (whole tokens, at most BINS bins)."""
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / BINS))
    edges = list(range(low, high + 1, width))
    counts = [0] * len(edges)
    for n in lengths:
        counts[(n - low) // width] += 1
    return {"edges": edges, "counts": counts}


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of the padded batches' positions that are padding, batches taken in `order` (each padded to its
    longest record, as the collator pads)."""
    total = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        total += max(batch) * len(batch)
        real += sum(batch)
    return round(1 - real / total, 4) if total else 0.0


def token_report(records: list[Any], processor: Any, sampler: Any, batch_size: int, seed: int) -> dict[str, Any]:
    """`records`: the task's tokenised training records; `sampler`: the training loader's own sampler (length
    grouping when the recipe asks for it)."""
    lengths = [len(r) for r in records]
    image_id = image_token_id(processor)
    images = [r.input_ids.count(image_id) for r in records] if image_id is not None else []
    trained = [sum(label != -100 for label in r.labels) for r in records]
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    report = {
        "records": len(lengths),
        "tokens_per_record": {
            "min": min(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths),
            "histogram": histogram(lengths),
        },
        "image_tokens_per_record": (
            {"mean": round(sum(images) / len(images), 1), "max": max(images)} if images else None
        ),
        "trained_tokens": sum(trained),
        "truncated": [{"ref": r.ref, "tokens_cut": r.cut, "answer_tokens_lost": r.lost} for r in records if r.cut > 0],
        "padding": {
            "shuffled": padding_fraction(lengths, shuffled, batch_size),
            "as_training_draws": padding_fraction(lengths, list(iter(sampler)), batch_size),
        },
        "batches_per_epoch": math.ceil(len(lengths) / batch_size),
    }
    return report
