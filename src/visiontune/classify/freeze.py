"""Freezing plans: linear probe and gradual unfreezing on an epoch schedule (a TrainerCallback).

Single process: frozen parameters get `requires_grad=False`, so no backward work is spent on them. Under DDP the
set of gradient-carrying parameters must not change after wrapping, so everything keeps `requires_grad=True` and
frozen parameters have their gradients dropped before each optimiser step instead (AdamW/SGD skip `grad=None`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import TrainerCallback

from visiontune.classify.config import UnfreezeStep
from visiontune.classify.layers import trainable_names


def set_trainable(model: nn.Module, names: set[str]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


class GradualUnfreeze(TrainerCallback):
    def __init__(
        self,
        model: nn.Module,
        groups: list[list[str]],
        head: list[str],
        schedule: list[UnfreezeStep],
        distributed: bool,
    ):
        self.model, self.groups, self.head, self.schedule = model, groups, head, schedule
        self.distributed = distributed
        self.active: set[str] = set()
        self.history: list[tuple[int, int]] = []  # (epoch, number of trainable tensors)
        self.apply(0)

    def apply(self, epoch: int) -> None:
        step = [s for s in self.schedule if s.epoch <= epoch]
        blocks = step[-1].blocks if step else 0
        self.active = trainable_names(self.groups, self.head, blocks)
        if not self.distributed:
            set_trainable(self.model, self.active)
        self.history.append((epoch, len(self.active)))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.apply(int(round(state.epoch or 0)))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.distributed:
            for n, p in self.model.named_parameters():
                if n not in self.active:
                    p.grad = None


def freeze_frozen_norms(model: nn.Module) -> None:
    """Batch norms whose parameters are all frozen keep their running statistics in training mode, so a frozen
    backbone stays the pretrained one (call after `model.train()`)."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            module.eval()


@dataclass
class TuningPlan:
    callbacks: list[TrainerCallback] = field(default_factory=list)
    include: set[str] | None = None  # parameters given to the optimiser (None: those with requires_grad)

    def optimizer(self, train: Any) -> Callable[[nn.Module], Any]:
        """The Fit's `make_optimizer` for the recipe's `train` section, over the parameters the plan trains."""
        from visiontune.run.optim import build_optimizer

        t, include = train, self.include
        return lambda model: build_optimizer(
            model, lr=t.lr, weight_decay=t.weight_decay, optimizer=t.optimizer, momentum=t.momentum, include=include
        )


def backbone_plan(model: Any, cfg: Any, apply_lora: Callable, probe: set[str], frozen: set[str]) -> TuningPlan:
    """What trains in a model with a backbone and a head on it (detect, segment), as `cfg.tune.method` says:
    everything (full) but `frozen`, only `probe` (linear_probe), the head plus a growing top of the backbone
    (gradual_unfreeze, over `model.layer_groups()`), or LoRA adapters plus the head (`apply_lora`)."""
    from visiontune.run.distributed import launched_world_size

    tune, plan = cfg.tune, TuningPlan()
    if cfg.train.grad_checkpointing and not model.enable_grad_checkpointing():
        print(f"note: {cfg.model} does not support gradient checkpointing; training without it")
    names = {n for n, _ in model.named_parameters()}
    if tune.method == "lora":
        apply_lora(model, tune.lora)
    elif tune.method == "linear_probe":
        set_trainable(model, probe)
    elif tune.method == "gradual_unfreeze":
        groups, rest = model.layer_groups()
        plan.callbacks.append(GradualUnfreeze(model, groups, rest, tune.unfreeze, launched_world_size() > 1))
        plan.include = names
    elif frozen:
        set_trainable(model, names - frozen)
    return plan
