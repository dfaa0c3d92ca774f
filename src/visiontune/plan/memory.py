"""Peak training memory: an estimate by parts, and a measurement to check it against.

The estimate is the sum of what a training step keeps alive: weights (parameters and buffers as stored), gradients
(one per trainable parameter, in its dtype), optimiser state (AdamW: two moments; SGD with momentum: one buffer),
the batch, and activations. Activations are not guessed from the architecture: they are the bytes autograd saves
for the backward pass of one forward on a real batch, counted through `torch.autograd.graph.saved_tensors_hooks`
(each storage once, parameters excluded), plus a working set (how far the live outputs of leaf modules rose
above that during the forward).
What it leaves out: allocator slack, kernel workspaces and the temporaries inside single ops, which is why the
comparison with a measured peak carries a tolerance (tests/test_plan.py). Kernel workspace is not modelled because
no simple rule fits it: on this project's CPU, oneDNN's bf16 kernels take per-thread scratch that varies with the
op's shape (measured 0.015-0.92 MiB per thread for single bf16 linear layers, 0.23 MiB for a small conv, none in
fp32), 0.39 MiB per thread on the tiny test classifier (small next to a real model's peak, large next to that
fixture's 1 MiB).

The measurement on CPU reads torch's profiler memory timeline (`export_memory_timeline`, the one CPU allocation
record torch keeps); on GPU, `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Optimiser state per trainable parameter element, in units of the parameter's own element size (torch keeps the
# moments in the parameter's dtype). 8-bit AdamW is counted in bytes instead (EIGHT_BIT).
OPTIMIZER_SLOTS = {"adamw": 2.0, "paged_adamw": 2.0, "sgd": 1.0}
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
# bitsandbytes' 8-bit AdamW, per tensor: two uint8 moments, for each an fp32 absmax per 256-element block (blockwise
# quantisation) and a 256-entry fp32 quantisation map; tensors under `min_8bit_size` (4096 elements) keep two fp32
# moments, whatever the parameter's dtype. About 2 bytes per element (checked against bitsandbytes' own state).
EIGHT_BIT_BLOCK, EIGHT_BIT_MIN = 256, 4096


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    batch: int  # the input tensors of one batch
    activations: int  # saved for backward
    working: int  # live outputs of leaf modules above `activations` at their highest (frozen parts)

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.batch + self.activations + self.working

    def as_json(self) -> dict[str, int]:
        return {**asdict(self), "peak": self.peak}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_slots(optimizer: str, momentum: float) -> float:
    if optimizer == "sgd" and momentum == 0:
        return 0.0
    return OPTIMIZER_SLOTS.get(optimizer, 2.0)  # an unknown optimiser: assume Adam-like, the common worst case


def _eight_bit_state(n: int) -> int:
    if n < EIGHT_BIT_MIN:
        return 8 * n
    return 2 * (n + 4 * -(-n // EIGHT_BIT_BLOCK) + 4 * 256)


def optimizer_bytes(params: list[torch.nn.Parameter], optimizer: str, momentum: float) -> int:
    """Optimiser state of `params`: slots of the parameters' own size, or 8-bit AdamW's bytes per element."""
    if optimizer in EIGHT_BIT:
        return sum(_eight_bit_state(p.numel()) for p in params)
    return int(sum(tensor_bytes(p) for p in params) * optimizer_slots(optimizer, momentum))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return [t for v in getattr(value, "values", lambda: [])() for t in _tensors(v)]  # ModelOutput


def batch_bytes(batch: Any) -> int:
    return sum(tensor_bytes(t) for t in _tensors(batch))


def activation_bytes(model: torch.nn.Module, forward: Callable[[], Any]) -> tuple[int, int]:
    """(saved, working) bytes of one `forward()`. saved: what autograd keeps for backward (each storage once, the
    model's own weights not counted again). working: how far the live outputs of leaf modules (followed until
    Python drops them) rose above that at their highest, which is what a frozen part of the model costs: it saves
    nothing for backward but holds a block's inputs, outputs and shortcuts while it runs. The forward's result is
    dropped, so nothing stays alive."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}
    live: dict[int, int] = {}
    peak = [0]

    def record() -> None:
        peak[0] = max(peak[0], sum((live | saved).values()))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in own and not t.is_meta:
            saved[ptr] = max(saved.get(ptr, 0), storage.nbytes())
        return t

    def leaf(module: torch.nn.Module, args: Any, output: Any) -> None:
        for t in _tensors(output):
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr not in own:
                live[ptr] = t.untyped_storage().nbytes()
                weakref.finalize(t, live.pop, ptr, None)
        record()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(leaf) for m in leaves]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = forward()
    finally:
        for hook in hooks:
            hook.remove()
    record()
    del result
    total = sum(saved.values())
    return total, max(0, peak[0] - total)


def estimate_memory(
    model: torch.nn.Module, batch: Any, forward: Callable[[], Any], optimizer: str, momentum: float
) -> MemoryEstimate:
    params = trainable(model)
    grads = sum(tensor_bytes(p) for p in params)
    saved, working = activation_bytes(model, forward)
    return MemoryEstimate(
        weights=weight_bytes(model),
        gradients=grads,
        optimizer=optimizer_bytes(params, optimizer, momentum),
        batch=batch_bytes(batch),
        activations=saved,
        working=working,
    )


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side logs start/stop lines and a failed GPU count to fd 2 (no setting turns them off);
    they would read as errors in the plan's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def measure_peak(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated on `device` while `step()` runs, weights and optimiser state included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp, native_stderr_silenced():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
            step()
        path = Path(tmp) / "timeline.json"
        p.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return int(max((sum(row) for row in sizes), default=0))
