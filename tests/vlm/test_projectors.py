"""Projectors: shapes and gradients for every registry entry, each design against a hand computation, and the
errors a wrong vision width or recipe produces."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from visiontune.core.errors import ModelError, RecipeError
from visiontune.vlm.projectors import (
    PROJECTORS,
    Mlp2xGeluProjector,
    MoEProjector,
    PatchReducerProjector,
    build_projector,
    output_tokens,
)

B, N, DV, DT, M = 2, 16, 32, 48, 4
OPTIONS = {"patch_reducer": {"num_patches_in": N, "num_tokens_out": M}}


def _features(seed: int = 0, shape: tuple[int, ...] = (B, N, DV)) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _gelu(z: Tensor) -> Tensor:
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def _mlp_by_hand(x: Tensor, mlp: torch.nn.Sequential) -> Tensor:
    w1, b1, w2, b2 = mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias
    return _gelu(x @ w1.T + b1) @ w2.T + b2


@pytest.mark.parametrize("kind", PROJECTORS)
def test_output_shape_and_token_count(kind: str) -> None:
    torch.manual_seed(0)
    projector = build_projector(kind, DV, DT, **OPTIONS.get(kind, {}))
    tokens = output_tokens(projector, N)
    assert tokens == (M if kind == "patch_reducer" else N)
    assert projector(_features()).shape == (B, tokens, DT)


@pytest.mark.parametrize("kind", PROJECTORS)
def test_gradients_reach_every_parameter(kind: str) -> None:
    torch.manual_seed(0)
    projector = build_projector(kind, DV, DT, **OPTIONS.get(kind, {}))
    projector(_features()).square().mean().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", PROJECTORS)
def test_wrong_vision_width_names_both_widths(kind: str) -> None:
    projector = build_projector(kind, DV, DT, **OPTIONS.get(kind, {}))
    with pytest.raises(ModelError, match="projector expects vision width 32 but got 24"):
        projector(_features(shape=(B, N, 24)))


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(RecipeError) as err:
        build_projector("qformer", DV, DT)
    assert "qformer" in str(err.value)
    assert all(kind in str(err.value) for kind in PROJECTORS)


def test_bad_options_are_recipe_errors() -> None:
    with pytest.raises(RecipeError, match="unknown: \\['experts'\\]"):
        build_projector("moe", DV, DT, experts=4)
    with pytest.raises(RecipeError, match="missing: \\['num_tokens_out'\\]"):
        build_projector("patch_reducer", DV, DT, num_patches_in=N)
    with pytest.raises(RecipeError, match="top_k is 5"):
        build_projector("moe", DV, DT, num_experts=4, top_k=5)


def test_mlp2x_gelu_matches_hand_computation() -> None:
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(DT, DV), torch.randn(DT), torch.randn(DT, DT), torch.randn(DT)
    projector = Mlp2xGeluProjector(DV, DT)
    with torch.no_grad():
        for layer, (w, b) in zip((projector.net[0], projector.net[2]), ((w1, b1), (w2, b2)), strict=True):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    x = _features()
    expected = _gelu(x @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(projector(x), expected)


def _moe_forcing_ranks() -> tuple[MoEProjector, Tensor]:
    """4 experts, router = identity on the first 4 features, so each token's feature order is its expert ranking."""
    torch.manual_seed(0)
    moe = MoEProjector(4, 6, num_experts=4, top_k=2)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    x = torch.tensor([[[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0], [1.0, 3.0, 0.0, 2.0]]])  # [1, 3, 4]
    return moe, x


def test_moe_routes_to_top_k_and_sums_renormalised_experts() -> None:
    moe, x = _moe_forcing_ranks()
    out = moe(x)  # [1, 3, 6]
    chosen = [(0, 1), (2, 3), (1, 3)]  # the two largest features of each token
    for t, (first, second) in enumerate(chosen):
        token = x[0, t]
        p_first, p_second = math.exp(token[first]), math.exp(token[second])  # the softmax denominator cancels
        mixed = p_first * _mlp_by_hand(token, moe.experts[first]) + p_second * _mlp_by_hand(token, moe.experts[second])
        torch.testing.assert_close(out[0, t], mixed / (p_first + p_second))
    assert moe.last_routing.tolist() == [1, 2, 1, 2]


def test_moe_aux_loss_matches_hand_computation() -> None:
    moe, x = _moe_forcing_ranks()
    moe(x)
    probs = x[0].softmax(dim=-1)  # [3, 4]: router logits are the features
    top1_share = torch.tensor([1, 1, 1, 0]) / 3  # top-1 experts 0, 2, 1
    expected = 4 * (top1_share * probs.mean(dim=0)).sum()
    torch.testing.assert_close(moe.aux_loss, expected)
    assert moe.aux_loss.requires_grad  # through the mean probabilities


def test_moe_aux_loss_is_one_when_balanced_and_e_when_collapsed() -> None:
    moe = MoEProjector(4, 6, num_experts=4, top_k=1, balance_coef=0.01)
    with torch.no_grad():
        moe.router.weight.copy_(50 * torch.eye(4))  # near-certain routing
    moe(torch.eye(4).unsqueeze(0))  # token e goes to expert e: f_e = P_e = 1/4
    torch.testing.assert_close(moe.aux_loss, torch.tensor(1.0))
    assert moe.balance_coef * moe.aux_loss.item() == pytest.approx(0.01)
    moe(torch.eye(4)[[0, 0, 0, 0]].unsqueeze(0))  # every token to expert 0
    torch.testing.assert_close(moe.aux_loss, torch.tensor(4.0))


def test_patch_reducer_with_identity_like_weights_selects_patches() -> None:
    projector = PatchReducerProjector(DV, DT, num_patches_in=N, num_tokens_out=M)
    with torch.no_grad():
        projector.pool.weight.zero_()
        projector.pool.weight[torch.arange(M), torch.arange(M) * (N // M)] = 1.0  # token m = patch 4m
        for block in projector.blocks:  # residual blocks become the identity
            block.mlp[2].weight.zero_()
            block.mlp[2].bias.zero_()
        projector.out.weight.copy_(torch.eye(DT, DV))  # [DT, DV]: copy the 32 features, pad with zeros
        projector.out.bias.zero_()
    x = _features()
    out = projector(x)  # [B, M, DT]
    torch.testing.assert_close(out[..., :DV], x[:, :: N // M])
    assert out[..., DV:].abs().max() == 0


def test_patch_reducer_starts_as_average_pooling() -> None:
    projector = PatchReducerProjector(DV, DT, num_patches_in=N, num_tokens_out=M)
    x = _features()
    pooled = projector.pool(x.transpose(1, 2)).transpose(1, 2)  # [B, M, DV]
    torch.testing.assert_close(pooled, x.reshape(B, M, N // M, DV).mean(dim=2))


def test_patch_reducer_wrong_patch_count_names_both() -> None:
    projector = PatchReducerProjector(DV, DT, num_patches_in=49, num_tokens_out=M)
    with pytest.raises(ModelError, match="num_patches_in=49 vision patches but got 16"):
        projector(_features())


def test_patch_reducer_hidden_width() -> None:
    projector = PatchReducerProjector(DV, DT, num_patches_in=N, num_tokens_out=M, depth=1, hidden=64)
    assert projector.blocks[0].norm.normalized_shape == (64,)
    assert projector(_features()).shape == (B, M, DT)


def test_non_sequence_input_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"\[batch, patches, 32\] but got shape \[2, 32\]"):
        build_projector("linear", DV, DT)(torch.zeros(2, DV))


def test_output_tokens_of_a_plain_module_is_n() -> None:
    assert output_tokens(torch.nn.Linear(DV, DT), N) == N
