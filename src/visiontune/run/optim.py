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
    """AdamW, SGD with Nesterov `momentum` (`optimizer="sgd"`), or a bitsandbytes AdamW (`BNB_ADAMW`). `include`:
    names to optimise (default: those with requires_grad). `layer_scales`: name -> LR multiplier."""
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
    if optimizer in BNB_ADAMW:
        return _bnb_adamw(groups, lr, **BNB_ADAMW[optimizer])
    return torch.optim.AdamW(groups, lr=lr)


# train.optimizer -> bitsandbytes AdamW settings; the same classes and settings transformers builds for the
# TrainingArguments `optim` names (TRAINER_OPTIM), built here so the parameter groups above still apply.
BNB_ADAMW: dict[str, dict] = {
    "adamw_8bit": {"optim_bits": 8, "is_paged": False},
    "paged_adamw_8bit": {"optim_bits": 8, "is_paged": True},
    "paged_adamw": {"optim_bits": 32, "is_paged": True},
}
TRAINER_OPTIM = {
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw": "paged_adamw_32bit",
}


def _bnb_adamw(groups: list[dict], lr: float, optim_bits: int, is_paged: bool) -> torch.optim.Optimizer:
    from visiontune.core.errors import RecipeError

    try:
        from bitsandbytes.optim import AdamW
    except ImportError as err:
        raise RecipeError(
            "train.optimizer 8-bit and paged AdamW need bitsandbytes: `pip install bitsandbytes==0.50.2` "
            "(or set train.optimizer: adamw)."
        ) from err
    # weight_decay=0 default: each group carries its own (none on biases and norms)
    return AdamW(groups, lr=lr, weight_decay=0.0, optim_bits=optim_bits, is_paged=is_paged)


def layer_decay_scales(groups: list[list[str]], head: list[str], decay: float) -> dict[str, float]:
    """LR multiplier decay**(distance from the head): the head trains at the full LR, the stem at the least."""
    depth = len(groups)
    scales = {n: decay ** (depth - i) for i, group in enumerate(groups) for n in group}
    scales.update({n: 1.0 for n in head})
    return scales
