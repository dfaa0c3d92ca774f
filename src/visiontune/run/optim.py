"""Optimiser with parameter groups: no weight decay on biases/norms, optional layer-wise LR decay.

We build it ourselves (rather than letting Trainer do it) because Trainer drops parameters that are frozen at
construction time, which would make gradual unfreezing a no-op, and has no layer-wise decay for arbitrary models.
"""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    include: set[str] | None = None,
    layer_scales: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov `momentum` (`optimizer="sgd"`). `include`: names to optimise (default: those
    with requires_grad). `layer_scales`: name -> LR multiplier."""
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if (include is None and not p.requires_grad) or (include is not None and name not in include):
            continue
        wd = 0.0 if p.ndim <= 1 or name.endswith(".bias") else weight_decay
        scale = (layer_scales or {}).get(name, 1.0)
        buckets.setdefault((wd, scale), []).append(p)
    groups = [{"params": ps, "weight_decay": wd, "lr": lr * s} for (wd, s), ps in buckets.items()]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def layer_decay_scales(groups: list[list[str]], head: list[str], decay: float) -> dict[str, float]:
    """LR multiplier decay**(distance from the head): the head trains at the full LR, the stem at the least."""
    depth = len(groups)
    scales = {n: decay ** (depth - i) for i, group in enumerate(groups) for n in group}
    scales.update({n: 1.0 for n in head})
    return scales
