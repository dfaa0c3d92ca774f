"""`train.batch_size: auto` and `train.global_batch_size`: the per-device batch and gradient accumulation a run trains
with, settled once the model is built and before the Trainer is made (the runner writes the result to config.yaml).

auto: the largest batch that fits, tried from the largest power of two the training data fills (at most MAX_AUTO;
at most the global batch per process when one is given), halving on out-of-memory. On a GPU each try is a real
forward + backward of that batch (`torch.OutOfMemoryError` means halve). On CPU a real out-of-memory is the kernel
killing the process, so a try is the memory estimate of `plan.memory` for that batch (activations measured at two
small batches and extended linearly) against MEMORY_SHARE of the memory psutil reports available; over it counts as
out-of-memory. Trainer has no such probe (accelerate's `find_executable_batch_size` retries a whole training loop
on CUDA only), hence this module."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel

from visiontune.core.errors import RecipeError

MAX_AUTO = 256
MEMORY_SHARE = 0.8  # of the memory available when the run starts: leave room for the data loader and the OS


def needs_settling(train: BaseModel) -> bool:
    return train.batch_size == "auto" or train.global_batch_size is not None


def with_batch(cfg: BaseModel, batch_size: int, grad_accum: int) -> BaseModel:
    """The recipe with these numbers and no global batch left to settle: what config.yaml records, a recipe that
    trains the same way again (the global batch is batch_size x grad_accum x processes)."""
    update = {"batch_size": batch_size, "grad_accum": grad_accum, "global_batch_size": None}
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def settle_batch(cfg: BaseModel, fit: Any, world_size: int, fits: Callable[[int], None] | None = None) -> BaseModel:
    """`cfg` with an integer `train.batch_size` and the `train.grad_accum` that gives `train.global_batch_size`.
    `fits(batch)` raises `torch.OutOfMemoryError` for a batch that does not fit (default: `probe_fits`)."""
    train = cfg.train
    if not needs_settling(train):
        return cfg
    target = train.global_batch_size
    if target is not None and target % world_size:
        raise RecipeError(
            f"train.global_batch_size {target} does not split evenly over {world_size} processes; give a multiple "
            f"of {world_size}."
        )
    if train.batch_size == "auto":
        most = min(MAX_AUTO, len(fit.train_dataset), target // world_size if target else MAX_AUTO)
        batch = agreed(largest_fitting(fits or probe_fits(cfg, fit), most))
        if target is not None:  # the largest batch that fits and divides the global batch
            batch = max(b for b in range(1, batch + 1) if (target // world_size) % b == 0)
    else:
        batch = train.batch_size
    if target is None:
        return with_batch(cfg, batch, train.grad_accum)
    if target % (batch * world_size):
        raise RecipeError(
            f"train.global_batch_size {target} is not a multiple of train.batch_size {batch} x {world_size} "
            "process(es); change one of them (or set train.batch_size: auto)."
        )
    return with_batch(cfg, batch, target // (batch * world_size))


def agreed(batch: int) -> int:
    """Under several processes every rank probes its own device: all train with the smallest batch any found."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batch
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([batch], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def largest_fitting(fits: Callable[[int], None], most: int) -> int:
    """Halve from the largest power of two <= `most` until `fits` stops raising out-of-memory."""
    batch = 1 << (max(1, most).bit_length() - 1)
    while True:
        try:
            fits(batch)
            return batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise RecipeError(
                    "train.batch_size: auto found no batch that fits in memory, not even one sample; use a smaller "
                    "model, LoRA/QLoRA, train.grad_checkpointing: true or lower precision."
                ) from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch //= 2


def probe_fits(cfg: BaseModel, fit: Any) -> Callable[[int], None]:
    """A `fits(batch)` on a throw-away Trainer over the run's model (the recipe's precision, loss and collator);
    the model is left as it was (`model_unchanged`)."""
    import tempfile
    from pathlib import Path

    from visiontune.plan.make import plan_config
    from visiontune.plan.probe import StepProbe, model_unchanged
    from visiontune.run.runner import make_trainer

    # the probe's Trainer saves nothing, so its folder is never created
    folder = Path(tempfile.gettempdir()) / f"visiontune-batch-probe-{os.getpid()}"
    probe = StepProbe(make_trainer(with_batch(plan_config(cfg), 1, 1), fit, folder))
    if probe.device.type == "cuda":

        def on_device(batch: int) -> None:
            with model_unchanged(probe.model):
                probe.forward_backward(probe.batch_of(batch))

        return on_device
    return cpu_fits(probe, cfg)


def cpu_fits(probe: Any, cfg: BaseModel, available: int | None = None) -> Callable[[int], None]:
    import psutil

    from visiontune.plan.memory import estimate_memory
    from visiontune.plan.probe import model_unchanged

    limit = MEMORY_SHARE * (available if available is not None else psutil.virtual_memory().available)
    momentum = getattr(cfg.train, "momentum", 0.0)

    def estimate(batch: int) -> Any:
        inputs = probe.batch_of(batch)
        with model_unchanged(probe.model):
            probe.model.train()
            return estimate_memory(probe.model, inputs, lambda: probe.loss(inputs), cfg.train.optimizer, momentum)

    small, large = estimate(1), estimate(2)
    fixed = small.weights + small.gradients + small.optimizer
    per_sample = max(0, large.peak - small.peak)
    base = small.peak - fixed - per_sample  # what a batch of zero would still hold besides weights and state

    def fits(batch: int) -> None:
        # the weights are already in memory, so what must still fit is what the step adds to them
        need = fixed - small.weights + base + per_sample * batch
        if need > limit:
            raise torch.OutOfMemoryError(f"batch {batch}: about {need / 2**30:.2f} GiB of {limit / 2**30:.2f} GiB")

    return fits
