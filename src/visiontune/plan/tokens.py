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
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    return {
        **record_stats(records, processor),
        "padding": {
            "shuffled": padding_fraction(lengths, shuffled, batch_size),
            "as_training_draws": padding_fraction(lengths, list(iter(sampler)), batch_size),
        },
        "batches_per_epoch": math.ceil(len(lengths) / batch_size),
    }


def pair_token_report(pairs: list[Any], processor: Any, sampler: Any, batch_size: int, seed: int) -> dict[str, Any]:
    """Preference pairs (`.chosen`, `.rejected` tokenised records; the sampler draws pairs): the records are the
    answers, both of each pair, and a batch of B pairs is 2B rows padded together to its longest answer (as
    vlm/preference.py's PairCollator pads them)."""
    n = len(pairs)
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    lengths = [len(r) for r in rows]
    per_pair = [lengths[i] + lengths[n + i] for i in range(n)]
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return {
        **record_stats(rows, processor),
        "pairs": n,
        "tokens_per_pair": {"min": min(per_pair), "mean": round(sum(per_pair) / n, 1), "max": max(per_pair)},
        "padding": {
            "shuffled": padding_fraction(lengths, pair_rows(shuffled, batch_size, n), 2 * batch_size),
            "as_training_draws": padding_fraction(
                lengths, pair_rows(list(iter(sampler)), batch_size, n), 2 * batch_size
            ),
        },
        "batches_per_epoch": math.ceil(n / batch_size),
    }


def pair_rows(order: list[int], batch_size: int, pairs: int) -> list[int]:
    """The rows of the pair batches drawn in `order`: each batch's chosen answers (row i), then its rejected ones
    (row pairs + i)."""
    rows = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows += batch + [pairs + i for i in batch]
    return rows


def record_stats(records: list[Any], processor: Any) -> dict[str, Any]:
    """Tokens per record (image tokens included), image tokens, trained tokens and the records max_length cut."""
    lengths = [len(r) for r in records]
    image_id = image_token_id(processor)
    images = [r.input_ids.count(image_id) for r in records] if image_id is not None else []
    trained = [sum(label != -100 for label in r.labels) for r in records]
    return {
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
    }
