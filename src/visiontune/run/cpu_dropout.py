"""LoRA dropout with a cheaper random mask on CPU.

torch fills a CPU dropout mask one element at a time from its Mersenne Twister (5-8 ns per element), and PEFT draws
a fresh mask over the input of every LoRA layer: on CPU those masks alone were about a fifth of a LoRA step of
`vlm_sft` (BENCHMARKS.md). numpy's PCG64 returns 64 random bits per ~1 ns draw; four 16-bit draws per draw,
compared with a threshold, make the mask. What neither torch nor PEFT offers; used only on CPU and only in training
(on GPUs torch's Philox generator is fast), and seeded from torch's generator, so `torch.manual_seed` and a resumed
run's restored RNG state still fix every mask.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

LEVELS = 1 << 16  # 16 random bits per element: the drop probability is rounded to a multiple of 1/65536


class CpuDropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same scaling of what it keeps, identity in eval) with its CPU mask from PCG64."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        seed = int(torch.randint(0, 2**62, (1,)))  # torch's generator decides, so its seeding still holds
        n = x.numel()
        bits = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
        keep = torch.from_numpy(bits >= round(self.p * LEVELS)).view(x.shape)
        return x * keep * (1.0 / (1.0 - self.p))


def cheapen_lora_dropout(model: nn.Module) -> int:
    """Swap each PEFT LoRA layer's `nn.Dropout` for `CpuDropout`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is nn.Dropout and drop.p > 0:
                drops[name] = CpuDropout(drop.p)
                swapped += 1
    return swapped
