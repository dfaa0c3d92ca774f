"""Training steps outside `Trainer.train`, on the Trainer's own pieces: its data loader and collator, its
`compute_loss` (a task's Trainer subclass keeps its loss), the task's optimiser factory and accelerate's autocast
for the recipe's precision. `Trainer` has no "run k steps and tell me the time / whether batch B fits" entry point,
which `visiontune plan` and `train.batch_size: auto` need; everything else is the Trainer's."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch


class StepProbe:
    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.model = trainer.model
        self.optimizer: Any = None

    @property
    def device(self) -> torch.device:
        return self.trainer.args.device

    def loss(self, batch: dict) -> torch.Tensor:
        inputs = self.trainer._prepare_inputs(batch)  # to the device, as training_step does
        with self.trainer.accelerator.autocast():  # bf16/fp16 as the recipe's precision sets it
            return self.trainer.compute_loss(self.model, inputs)

    def forward_backward(self, batch: dict) -> None:
        self.model.train()
        self.loss(batch).backward()

    def step(self, batch: dict) -> None:
        """forward + backward + optimiser step, gradients freed after (as Trainer does)."""
        if self.optimizer is None:
            self.optimizer = self.trainer.make_optimizer(self.model)
        self.forward_backward(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_loss(self, batch: dict) -> None:
        self.model.eval()
        with torch.no_grad():
            self.loss(batch)

    def train_batches(self) -> Iterator[dict]:
        """The training loader's batches, as training draws them (sampler, collator, augmentation), repeated."""
        while True:
            yield from self.trainer.get_train_dataloader()

    def batch_of(self, size: int) -> dict:
        """A training batch of exactly `size` records (cycling through the dataset), through the task's collator."""
        dataset = self.trainer.train_dataset
        return self.trainer.data_collator([dataset[i % len(dataset)] for i in range(size)])

    def timed(self, fn: Any, batches: Iterator[dict], count: int) -> float:
        """Median seconds of `fn(batch)` over `count` calls after one warm-up call (the median, as the machine
        may be shared)."""
        fn(next(batches))
        times = []
        for _ in range(count):
            batch = next(batches)
            self._sync()
            start = time.perf_counter()
            fn(batch)
            self._sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def model_unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Probing batch sizes runs forward and backward on the model training will use: put back what that touches
    (buffers such as BatchNorm statistics, gradients, train/eval mode, the RNGs)."""
    from visiontune.run.runner import rng_preserved

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    mode = model.training
    try:
        with rng_preserved():
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        model.zero_grad(set_to_none=True)
        model.train(mode)
