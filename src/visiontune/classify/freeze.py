"""Freezing plans: linear probe and gradual unfreezing on an epoch schedule (a TrainerCallback).

Single process: frozen parameters get `requires_grad=False`, so no backward work is spent on them. Under DDP the
set of gradient-carrying parameters must not change after wrapping, so everything keeps `requires_grad=True` and
frozen parameters have their gradients dropped before each optimiser step instead (AdamW/SGD skip `grad=None`).
"""

from __future__ import annotations

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
