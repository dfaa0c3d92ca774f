"""Ordered layer groups (input -> output) of a classifier's backbone, used by gradual unfreezing and layer-wise
LR decay. timm models describe their own groups (`group_matcher`); for transformers models we group by the
block index in parameter names — transformers has no such API, so this part is ours."""

from __future__ import annotations

import re

from visiontune.classify.model import ImageClassifier

_BLOCK = re.compile(r"\.(?:layer|layers|blocks|stages|block)\.(\d+)\.")


def layer_groups(model: ImageClassifier) -> tuple[list[list[str]], list[str]]:
    """(body groups from input to output, head parameter names). Names are full names in `model`."""
    head_prefixes = tuple(model.head_names())
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith(head_prefixes)]
    body = [n for n in names if not n.startswith(head_prefixes)]
    groups = _timm_groups(model, body) if model.kind == "timm" else indexed_groups(body)
    return [g for g in groups if g], head


def _timm_groups(model: ImageClassifier, body: list[str]) -> list[list[str]]:
    from timm.models import group_parameters

    backbone = model.backbone
    matcher = backbone.group_matcher(coarse=False) if hasattr(backbone, "group_matcher") else None
    if matcher is None:
        return [body]
    wanted = set(body)
    grouped = group_parameters(backbone, matcher)
    return [[f"backbone.{n}" for n in grouped[k] if f"backbone.{n}" in wanted] for k in sorted(grouped)]


def indexed_groups(body: list[str]) -> list[list[str]]:
    stem, tail, blocks = [], [], {}
    for name in body:
        match = _BLOCK.search(name)
        if match:
            blocks.setdefault(int(match.group(1)), []).append(name)
        elif not blocks:
            stem.append(name)
        else:
            tail.append(name)  # final norm / pooler: belongs with the last block
    ordered = [blocks[k] for k in sorted(blocks)]
    if ordered:
        ordered[-1] += tail
    else:
        stem += tail
    return [stem, *ordered]


def trainable_names(groups: list[list[str]], head: list[str], blocks: int | str) -> set[str]:
    """Head plus the last `blocks` groups ("all": everything)."""
    chosen = groups if blocks == "all" else groups[len(groups) - int(blocks) :] if int(blocks) > 0 else []
    return set(head).union(*chosen) if chosen else set(head)
