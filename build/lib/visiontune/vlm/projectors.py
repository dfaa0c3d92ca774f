"""Projectors: the middle piece of a LLaVA-style model (vision encoder + projector + causal LM). Each maps vision
features [B, N, Dv] to language-model input embeddings [B, M, Dt]; M = N except for `patch_reducer`.

Kinds, picked by name with `build_projector` (registry `PROJECTORS`):
- `linear`: one Linear (LLaVA, Liu et al., NeurIPS 2023).
- `mlp2x_gelu`: Linear → GELU → Linear (LLaVA-1.5, Liu et al., CVPR 2024; its `mm_projector_type: mlp2x_gelu`).
- `moe`: a top-k mixture of mlp2x_gelu experts (sparse MoE connector as in CuMo, Li et al., 2024) with the
  Switch-Transformer load-balancing loss (Fedus et al., JMLR 2022).
- `patch_reducer`: learned pooling of the N patches into M tokens, residual MLP blocks, a Linear to Dt (the design
  pairing CLIP, 7 x 7 = 49 patches, with Phi-2: fewer image tokens leave more of a small LM's context for text).

Every projector checks its input is [B, N, dv] first, so a vision encoder of the wrong width fails with a sentence
naming both widths instead of a matmul shape error deep inside.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visiontune.core.errors import ModelError, RecipeError

__all__ = [
    "PROJECTORS",
    "LinearProjector",
    "Mlp2xGeluProjector",
    "MoEProjector",
    "PatchReducerProjector",
    "Projector",
    "build_projector",
    "output_tokens",
]


class Projector(nn.Module):
    """Base class: `forward` validates the input shape, then calls the subclass's `project`."""

    def __init__(self, dv: int, dt: int) -> None:
        super().__init__()
        self.dv, self.dt = dv, dt

    def forward(self, features: Tensor) -> Tensor:
        _check_features(features, self.dv)
        return self.project(features)  # [B, M, Dt]

    def project(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def output_tokens(self, n_patches: int) -> int:
        """Number of LM tokens produced from `n_patches` vision patches (one each, unless overridden)."""
        return n_patches


class LinearProjector(Projector):
    """One Linear from vision width to LM width (LLaVA-1.0)."""

    def __init__(self, dv: int, dt: int) -> None:
        super().__init__(dv, dt)
        self.proj = nn.Linear(dv, dt)

    def project(self, features: Tensor) -> Tensor:
        return self.proj(features)  # [B, N, Dt]


class Mlp2xGeluProjector(Projector):
    """Linear(dv, hidden) → GELU → Linear(hidden, dt), hidden = dt by default (LLaVA-1.5 `mlp2x_gelu`)."""

    def __init__(self, dv: int, dt: int, hidden: int | None = None) -> None:
        super().__init__(dv, dt)
        self.net = _mlp2x_gelu(dv, hidden or dt, dt)

    def project(self, features: Tensor) -> Tensor:
        return self.net(features)  # [B, N, Dt]


class MoEProjector(Projector):
    """Sparse mixture of mlp2x_gelu experts: a bias-free router (Linear dv → E, softmax) picks the top-k experts per
    token and the output is their sum weighted by the router probabilities renormalised over those k.

    After each forward:
    - `aux_loss` is the Switch-Transformer load-balancing loss E · Σ_e f_e · P_e, where f_e is the fraction of
      tokens whose top-1 choice is e (top-1 as in the Switch paper, also with k > 1) and P_e the mean router
      probability of e. It is 1 when routing is balanced (every f_e = P_e = 1/E; in fact whenever P is uniform)
      and E when every token goes to one expert with certainty. f is a count, so gradients reach the router
      through P only.
    - `last_routing` [E] counts the token slots routed to each expert (all k choices), for logging.

    `balance_coef` is for the trainer, which adds `balance_coef * aux_loss` to the LM loss (0.01 as in the Switch
    paper); at balance that term is `balance_coef`.
    """

    def __init__(
        self,
        dv: int,
        dt: int,
        num_experts: int = 4,
        top_k: int = 2,
        hidden: int | None = None,
        balance_coef: float = 0.01,
    ) -> None:
        super().__init__(dv, dt)
        if not 1 <= top_k <= num_experts:
            raise RecipeError(f"projector option top_k is {top_k} but must be between 1 and num_experts={num_experts}.")
        self.top_k, self.balance_coef = top_k, balance_coef
        self.router = nn.Linear(dv, num_experts, bias=False)
        self.experts = nn.ModuleList(_mlp2x_gelu(dv, hidden or dt, dt) for _ in range(num_experts))
        self.aux_loss: Tensor = torch.zeros(())
        self.register_buffer("last_routing", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def project(self, features: Tensor) -> Tensor:
        b, n, _ = features.shape
        tokens = features.reshape(b * n, self.dv)  # [T, Dv]
        probs = self.router(tokens).float().softmax(dim=-1)  # [T, E]; float32 so bf16 ties don't flip choices
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, K], sorted: chosen[:, 0] is the top-1 expert
        weights = weights / weights.sum(dim=-1, keepdim=True)  # [T, K]
        self._record(probs, chosen)
        return self._dispatch(tokens, weights, chosen).reshape(b, n, self.dt)  # [B, N, Dt]

    def _dispatch(self, tokens: Tensor, weights: Tensor, chosen: Tensor) -> Tensor:
        out = tokens.new_zeros(tokens.shape[0], self.dt)  # [T, Dt]
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)  # the tokens routed to e, and which choice it was
            # Called even with no tokens: the expert then gets a zero gradient rather than none, which DDP requires.
            routed = weights[token, slot, None] * expert(tokens[token])  # [T_e, Dt]
            out.index_add_(0, token, routed.to(out.dtype))
        return out

    def _record(self, probs: Tensor, chosen: Tensor) -> None:
        num_experts = probs.shape[-1]
        top1_share = torch.bincount(chosen[:, 0], minlength=num_experts).to(probs.dtype) / chosen.shape[0]  # f [E]
        self.aux_loss = num_experts * (top1_share * probs.mean(dim=0)).sum()
        self.last_routing = torch.bincount(chosen.flatten(), minlength=num_experts)


class PatchReducerProjector(Projector):
    """Learned pooling of the patch axis (a Linear N → M on [B, Dv, N]), then `depth` residual blocks
    (LayerNorm → Linear → GELU → Linear, + residual) at width `hidden` (dv by default), then a Linear to dt.

    The pooling starts as adaptive average pooling (each output token the mean of a contiguous run of patches), not
    a random Linear: random mixing of all patches would discard the spatial order the encoder produced.
    """

    def __init__(
        self,
        dv: int,
        dt: int,
        num_patches_in: int,
        num_tokens_out: int,
        depth: int = 2,
        hidden: int | None = None,
    ) -> None:
        super().__init__(dv, dt)
        width = hidden or dv
        self.num_patches_in, self.num_tokens_out = num_patches_in, num_tokens_out
        self.pool = nn.Linear(num_patches_in, num_tokens_out)
        self.widen = nn.Linear(dv, width) if width != dv else nn.Identity()
        self.blocks = nn.Sequential(*(_ResidualMlp(width) for _ in range(depth)))
        self.out = nn.Linear(width, dt)
        with torch.no_grad():
            eye = torch.eye(num_patches_in).unsqueeze(0)  # [1, N, N]
            self.pool.weight.copy_(F.adaptive_avg_pool1d(eye, num_tokens_out)[0].T)  # [M, N]
            self.pool.bias.zero_()

    def project(self, features: Tensor) -> Tensor:
        if features.shape[1] != self.num_patches_in:
            raise ModelError(
                f"patch_reducer projector expects num_patches_in={self.num_patches_in} vision patches but got "
                f"{features.shape[1]}; set num_patches_in to the vision encoder's patch count."
            )
        pooled = self.pool(features.transpose(1, 2)).transpose(1, 2)  # [B, Dv, N] → [B, Dv, M] → [B, M, Dv]
        return self.out(self.blocks(self.widen(pooled)))  # [B, M, Dt]

    def output_tokens(self, n_patches: int) -> int:
        return self.num_tokens_out


class _ResidualMlp(nn.Module):
    """x + Linear(GELU(Linear(LayerNorm(x)))), pre-norm so the block can start close to the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = _mlp2x_gelu(width, width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))  # [B, M, W]


def _mlp2x_gelu(dv: int, hidden: int, dt: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dv, hidden), nn.GELU(), nn.Linear(hidden, dt))


def _check_features(features: Tensor, dv: int) -> None:
    if features.dim() != 3:
        raise ModelError(
            f"projector expects vision features [batch, patches, {dv}] but got shape {list(features.shape)}."
        )
    if features.shape[-1] != dv:
        raise ModelError(f"projector expects vision width {dv} but got {features.shape[-1]}.")


PROJECTORS: dict[str, type[Projector]] = {
    "linear": LinearProjector,
    "mlp2x_gelu": Mlp2xGeluProjector,
    "moe": MoEProjector,
    "patch_reducer": PatchReducerProjector,
}


def build_projector(kind: str, dv: int, dt: int, **options: int | float | None) -> Projector:
    """A projector by registry name.

    Args:
        kind: A key of `PROJECTORS`.
        dv: Width of the vision features (the vision encoder's hidden size).
        dt: Width of the LM input embeddings.
        **options: The kind's own constructor arguments (e.g. `num_experts`, `num_tokens_out`).

    Raises:
        RecipeError: Unknown kind, an option the kind does not take, or a required one missing.
    """
    if kind not in PROJECTORS:
        raise RecipeError(f"projector kind is `{kind}` but must be one of {list(PROJECTORS)}.")
    cls = PROJECTORS[kind]
    params = dict(inspect.signature(cls).parameters)
    del params["dv"], params["dt"]
    unknown = sorted(set(options) - set(params))
    missing = [name for name, p in params.items() if p.default is inspect.Parameter.empty and name not in options]
    if unknown or missing:
        raise RecipeError(
            f"projector `{kind}` got options {sorted(options)} but takes {list(params)} (unknown: {unknown}, "
            f"missing: {missing})."
        )
    return cls(dv, dt, **options)


def output_tokens(projector: nn.Module, n_patches: int) -> int:
    """LM tokens a projector makes from `n_patches` patches: M for `patch_reducer`, N otherwise."""
    return projector.output_tokens(n_patches) if isinstance(projector, Projector) else n_patches
