"""bitsandbytes layers on CPU: a model that trains never runs on weights packed for inference.

bitsandbytes (0.50.2 read) `Linear4bit.forward` repacks the layer's 4-bit weights into an inference-only CPU layout
the first time it runs in eval mode on an input without grad, when `self.support_avx512bf16_for_cpu` (read once in
`__init__` from the CPU: AVX-512 BF16) is set. The repack marks `weight.quant_state.packing_format_for_cpu` and
`.train()` does not undo it: from then on `matmul_4bit` calls the inference kernel `gemv_4bit`, which has no
autograd and adds the bias in place. So a training step after an evaluation (the runner's, or the Trainer's loss
pass) fails with "a view of a leaf Variable that requires grad is being used in an in-place operation", or, with no
bias, trains with no gradient through the frozen 4-bit weights, so earlier layers' adapters get wrong ones.

`keep_trainable_layout` clears that per-layer gate, which outlives train() / eval(), and unpacks a layer already
packed with bitsandbytes' own inverse (the one it runs before saving or moving to a GPU; it re-rounds absmax, so
prevention is the rule). Eval-only models (`visiontune eval` / `compare`) keep the fast kernel: saving one after an
evaluation is safe because `Linear4bit._save_to_state_dict` unpacks first.

`Linear8bitLt` keeps no such state: each forward picks the training or inference matmul from `self.training`.
"""

from __future__ import annotations

from torch import nn


def keep_trainable_layout(model: nn.Module) -> nn.Module:
    """Every 4-bit layer of `model` stays in the layout training needs, through any later evaluation."""
    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = False  # the repack's only gate that train() / eval() leave alone
        if is_packed(layer):
            _unpack(layer)
    return model


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_bnb_linear4bit(m)]


def is_packed(layer: nn.Module) -> bool:
    """Whether the layer's weights are in bitsandbytes' inference-only CPU layout."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    """By class name, so models without bitsandbytes never import it; PEFT's wrapper of the same name is not one."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _unpack(layer: nn.Module) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
