"""L-LoRA: LoRA linearised around its initial parameters (Tang et al., ICLR 2024, "Parameter Efficient Multi-task
Model Fusion with Partial Linearization").

The adapted model is the first-order Taylor expansion of the LoRA network in its trainable parameters θ only
(lora_A / lora_B), around their initial values θ₀:

    f_lin(x; θ) = f(x; θ₀) + J_θ f(x; θ₀) · (θ - θ₀)

Base weights and buffers stay frozen. f_lin is linear in θ, which is what lets task vectors θ - θ₀ trained on
different tasks be added with little interference. PEFT builds the LoRA layers; PEFT has no linearisation, so this
module is own code: it evaluates the expansion with `torch.func.functional_call` + `torch.func.jvp` (one forward
pass carrying primal and tangent), and gradients reach θ through the tangent by ordinary autograd.

Dropout and BatchNorm: the wrapped model always runs in eval mode, whatever `train()` is called with. With dropout
on, every step would linearise a different random network and f_lin would not be one fixed linear function of θ;
train-mode BatchNorm would also update buffers that L-LoRA keeps frozen. So `lora_dropout` (and any dropout in the
backbone) has no effect here; set it to 0 in L-LoRA recipes so the recipe says what runs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from visiontune.core.errors import ModelError


class _Snapshot(nn.Module):
    """θ₀ as persistent buffers, so it follows `.to()`, lands in the state dict and never receives gradients."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(_buffer_name(name), tensor.detach().clone())

    def get(self, name: str) -> Tensor:
        return getattr(self, _buffer_name(name))


def _buffer_name(param_name: str) -> str:
    # Buffer names cannot contain dots; ':' never occurs in PyTorch/PEFT parameter paths, so this is one-to-one.
    return param_name.replace(".", ":")


class LinearizedModel(nn.Module):
    """First-order Taylor expansion of `model` in its trainable parameters around their values at construction.

    The trainable parameters θ stay the wrapped model's own parameters (so optimisers, `requires_grad` and PEFT keep
    working); θ₀ is a frozen snapshot in `self.theta0`. Frozen parameters and buffers are not copied:
    `functional_call` reads them from the wrapped model, so they follow `.to()`.

    Args:
        model: Any module; every parameter with `requires_grad=True` at construction is linearised (for a PEFT
            model: the LoRA matrices, plus any `modules_to_save` left trainable).

    Raises:
        ModelError: If the model has no trainable parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ModelError(
                "LinearizedModel needs a model with trainable parameters to linearise; none of its "
                "parameters has requires_grad=True."
            )
        self.model = model
        self.trainable_names: tuple[str, ...] = tuple(trainable)
        self.theta0 = _Snapshot(trainable)
        self.model.eval()

    def train(self, mode: bool = True) -> LinearizedModel:
        """Set the wrapper's mode; the wrapped model stays in eval mode (see the module docstring for why)."""
        super().train(mode)
        self.model.eval()
        return self

    def initial_parameters(self) -> dict[str, Tensor]:
        """θ₀, the expansion point, by parameter name of the wrapped model."""
        return {name: self.theta0.get(name) for name in self.trainable_names}

    def trainable_delta(self) -> dict[str, Tensor]:
        """θ - θ₀ (detached), by parameter name: the task vector that L-LoRA models are fused with."""
        theta0 = self.initial_parameters()
        return {name: (p - theta0[name]).detach() for name, p in self._theta().items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluate f_lin(x; θ); takes the wrapped model's arguments and returns its output structure.

        Every floating-point tensor in the output (a tensor, tuple, dict or transformers `ModelOutput`) is
        primal + tangent; other tensors (e.g. integer ids) and non-tensor values come from f(x; θ₀).
        """
        if self.model.training:  # someone switched the inner model back to train mode directly
            self.model.eval()
        theta0 = self.initial_parameters()
        delta = {name: p - theta0[name] for name, p in self._theta().items()}
        structure: dict[str, Any] = {}

        def call(params: dict[str, Tensor]) -> tuple[Tensor, ...]:
            leaves, structure["spec"] = tree_flatten(functional_call(self.model, params, args, kwargs))
            # jvp returns tensors only; non-tensor leaves (None, flags) are kept aside to rebuild the output.
            structure["other"] = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]
            return tuple(leaf for leaf in leaves if isinstance(leaf, Tensor))

        # Forward-mode AD has no rule for the fused attention kernels; the math backend is plain matmul + softmax.
        with sdpa_kernel(SDPBackend.MATH):
            primal, tangent = jvp(call, (theta0,), (delta,))
        return _rebuild(structure, primal, tangent)

    def merge_to_nonlinear(self) -> nn.Module:
        """Return the wrapped model holding the trained θ, i.e. the ordinary LoRA network f(x; θ).

        This is NOT the model that was trained: f(x; θ) differs from f_lin(x; θ) by the second- and higher-order
        terms of the expansion, and keeping those out is the point of L-LoRA. Use it only where that approximation
        is wanted. To keep the trained model exactly, keep the wrapper: its state dict holds θ (under `model.`) and
        θ₀ (under `theta0.`), and `load_state_dict` into a fresh wrapper of the same architecture restores both;
        a PEFT `save_pretrained` of the inner model alone would lose θ₀.

        The returned module is the wrapped one itself (not a copy), set to the wrapper's train/eval mode; for a PEFT
        model, `merge_and_unload()` then folds θ into the base weights.
        """
        return self.model.train(self.training)

    def _theta(self) -> dict[str, nn.Parameter]:
        # Looked up on every call rather than cached, so parameters replaced by `.to()` or loading are picked up.
        params = dict(self.model.named_parameters())
        return {name: params[name] for name in self.trainable_names}


def _rebuild(structure: dict[str, Any], primal: tuple[Tensor, ...], tangent: tuple[Tensor, ...]) -> Any:
    tensors = iter(zip(primal, tangent, strict=True))
    leaves = []
    for leaf in structure["other"]:
        if leaf is None:
            p, t = next(tensors)
            leaf = p + t if p.is_floating_point() or p.is_complex() else p
        leaves.append(leaf)
    return tree_unflatten(leaves, structure["spec"])


def linearize_lora(peft_model: nn.Module) -> LinearizedModel:
    """Wrap a LoRA model (e.g. from `peft.get_peft_model`) as L-LoRA, expanding around its current LoRA weights.

    Every trainable parameter is linearised, not only the LoRA matrices: freeze a trainable head first if it should
    train non-linearly. With PEFT's default init (lora_B = 0) the tangent through lora_A is zero at θ₀, so lora_A
    keeps its initial value and only lora_B learns; that is a property of the expansion, not of this code.

    Args:
        peft_model: A model with trainable `lora_*` parameters.

    Returns:
        The linearised model; train it like any module and keep it (or its state dict) as the result.

    Raises:
        ModelError: If the model has no trainable LoRA parameters.
    """
    if not any("lora_" in name and p.requires_grad for name, p in peft_model.named_parameters()):
        raise ModelError(
            f"linearize_lora needs trainable LoRA parameters (lora_A/lora_B) but the "
            f"{type(peft_model).__name__} has none; apply LoRA with peft.get_peft_model first."
        )
    return LinearizedModel(peft_model)
