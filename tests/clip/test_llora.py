"""L-LoRA: the wrapper evaluates f(θ₀) + J·(θ - θ₀), trains only θ, and is not plain LoRA once θ moves far."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from visiontune.clip.llora import LinearizedModel, linearize_lora
from visiontune.core.errors import ModelError

F64 = torch.float64


class _MLP(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.q = nn.Linear(4, 8)
        self.drop = nn.Dropout(dropout)
        self.v = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.v(self.drop(torch.tanh(self.q(x))))


def _lora_params(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def _shift_lora(model: nn.Module, seed: int, scale: float) -> dict[str, Tensor]:
    """Add seeded Gaussian noise to every LoRA matrix in place and return it."""
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    with torch.no_grad():
        for name, p in _lora_params(model).items():
            delta[name] = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p += delta[name]
    return delta


def _mlp(seed: int = 0, dtype: torch.dtype = F64, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], lora_dropout=dropout)
    model = get_peft_model(_MLP(dropout), config).to(dtype)
    _shift_lora(model, seed + 100, 0.5)  # θ₀ with lora_B != 0, so the tangent through lora_A is exercised too
    return model


def _clip(seed: int = 0, dtype: torch.dtype = torch.float32, random_theta0: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(CLIPVisionModel(config), lora).to(dtype).eval()
    if random_theta0:
        _shift_lora(model, seed + 100, 0.3)
    return model


def _pixels(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7), dtype=dtype)


def _mlp_reference(model: nn.Module, delta: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """f(x; θ₀) and J·Δ for the LoRA MLP, written out by hand (tanh' = 1 - tanh²)."""
    p = {name.removeprefix("base_model.model."): t.detach() for name, t in model.named_parameters()}
    d = {name.removeprefix("base_model.model."): t for name, t in delta.items()}
    s = 4 / 2  # lora_alpha / r

    def layer(name: str, inp: Tensor) -> tuple[Tensor, Tensor]:
        a, b = p[f"{name}.lora_A.default.weight"], p[f"{name}.lora_B.default.weight"]
        da, db = d[f"{name}.lora_A.default.weight"], d[f"{name}.lora_B.default.weight"]
        out = inp @ p[f"{name}.base_layer.weight"].T + p[f"{name}.base_layer.bias"] + s * inp @ a.T @ b.T
        return out, s * inp @ (da.T @ b.T + a.T @ db.T)

    h, dh_theta = layer("q", x)
    act = torch.tanh(h)
    dact = (1 - act**2) * dh_theta
    y, dy_theta = layer("v", act)
    w_v = p["v.base_layer.weight"] + s * p["v.lora_B.default.weight"] @ p["v.lora_A.default.weight"]
    return y, dy_theta + dact @ w_v.T


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_mlp_output_is_first_order_expansion_and_gradient_is_its_transpose():
    x = torch.randn(5, 4, dtype=F64)
    reference = _mlp()  # same seed: an identical, independent copy at θ₀
    wrapped = LinearizedModel(_mlp())
    delta = _shift_lora(wrapped.model, seed=1, scale=0.7)

    f0, jvp_delta = _mlp_reference(reference, delta, x)
    out = wrapped(x=x)
    torch.testing.assert_close(out, f0 + jvp_delta, rtol=1e-10, atol=1e-10)
    assert _rel(out, reference(x)) > 0.1  # Δ moved the output, so the check above was not trivial

    # Backward must give Jᵀw: <∇_θ <w, f_lin>, Δ'> = <w, J Δ'> for any Δ'.
    w = torch.randn_like(out)
    (w * out).sum().backward()
    probe = {name: torch.randn_like(t) for name, t in delta.items()}
    _, jvp_probe = _mlp_reference(reference, probe, x)
    grads = {name: p.grad for name, p in _lora_params(wrapped.model).items()}
    assert sum((grads[n] * probe[n]).sum() for n in probe).item() == pytest.approx((w * jvp_probe).sum().item())


def test_clip_output_matches_finite_differences_of_an_independent_copy():
    x = _pixels(F64)
    wrapped = LinearizedModel(_clip(dtype=F64))
    delta = _shift_lora(wrapped.model, seed=1, scale=0.5)
    out = wrapped(pixel_values=x)

    reference, eps = _clip(dtype=F64), 1e-5
    f0 = reference(pixel_values=x)
    _shift_lora(reference, seed=1, scale=eps * 0.5)
    plus = reference(pixel_values=x)
    _shift_lora(reference, seed=1, scale=-2 * eps * 0.5)
    minus = reference(pixel_values=x)

    assert type(out) is type(f0)
    for key in ("last_hidden_state", "pooler_output"):
        expected = f0[key] + (plus[key] - minus[key]) / (2 * eps)
        torch.testing.assert_close(out[key], expected, rtol=1e-6, atol=1e-7)
        assert _rel(out[key], f0[key]) > 0.05
    assert {n for n in delta} == set(wrapped.trainable_names)


def test_at_theta0_output_equals_plain_lora():
    x = _pixels()
    plain = _clip()(pixel_values=x)
    out = LinearizedModel(_clip())(pixel_values=x)
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(out[key], plain[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("scale", "close"), [(1e-4, True), (1.0, False)])
def test_linearised_is_plain_lora_only_for_small_delta(scale, close):
    x = _pixels(F64)
    f0 = _clip(dtype=F64)(pixel_values=x).pooler_output
    wrapped = LinearizedModel(_clip(dtype=F64))
    _shift_lora(wrapped.model, seed=1, scale=scale)
    plain = _clip(dtype=F64)
    _shift_lora(plain, seed=1, scale=scale)
    lin, lora = wrapped(pixel_values=x).pooler_output, plain(pixel_values=x).pooler_output

    gap, change = (lin - lora).norm(), (lora - f0).norm()
    if close:  # second-order gap: tiny next to the first-order change
        assert gap / change < 1e-2
    else:  # the L-LoRA vs LoRA distinction
        assert _rel(lin, lora) > 0.1
        torch.testing.assert_close(wrapped.merge_to_nonlinear()(pixel_values=x).pooler_output, lora)


def test_only_lora_parameters_get_gradients_and_sgd_reduces_loss():
    torch.manual_seed(3)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    wrapped = linearize_lora(_mlp(dtype=torch.float32))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    before = nn.functional.mse_loss(wrapped(x), y)
    before.backward()

    for name, p in wrapped.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert all(b.grad is None and not b.requires_grad for b in wrapped.theta0.buffers())
    optimizer.step()
    assert nn.functional.mse_loss(wrapped(x), y).item() < before.item()
    delta = wrapped.trainable_delta()
    assert set(delta) == set(wrapped.trainable_names) and all(d.abs().sum() > 0 for d in delta.values())


def test_default_peft_init_leaves_lora_a_without_gradient():
    wrapped = linearize_lora(_clip(random_theta0=False))  # lora_B = 0 at θ₀, so J through lora_A is zero
    wrapped(pixel_values=_pixels()).pooler_output.square().sum().backward()
    grads = {name: p.grad for name, p in _lora_params(wrapped.model).items()}
    assert all(g.abs().max() == 0 for n, g in grads.items() if "lora_A" in n)
    assert all(g.abs().max() > 0 for n, g in grads.items() if "lora_B" in n)


def test_train_mode_is_deterministic_with_dropout():
    x = torch.randn(8, 4, dtype=F64)
    wrapped = LinearizedModel(_mlp(dropout=0.5)).train()
    _shift_lora(wrapped.model, seed=1, scale=0.3)
    first, second = wrapped(x), wrapped(x)
    assert wrapped.training and not any(m.training for m in wrapped.model.modules())
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, wrapped.eval()(x), rtol=0, atol=0)


def test_state_dict_round_trip_restores_theta_and_theta0():
    x = _pixels()
    wrapped = LinearizedModel(_clip(seed=0))
    _shift_lora(wrapped.model, seed=1, scale=0.5)
    state = wrapped.state_dict()
    assert any(key.startswith("theta0.") for key in state)

    fresh = LinearizedModel(_clip(seed=5))  # different base weights and θ₀ until loaded
    assert _rel(fresh(pixel_values=x).pooler_output, wrapped(pixel_values=x).pooler_output) > 0.01
    fresh.load_state_dict(state)
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(fresh(pixel_values=x)[key], wrapped(pixel_values=x)[key], rtol=0, atol=0)


def test_linearize_lora_rejects_models_without_trainable_lora():
    with pytest.raises(ModelError, match="lora_A/lora_B"):
        linearize_lora(_MLP())
    frozen = _mlp()
    frozen.requires_grad_(False)
    with pytest.raises(ModelError, match="lora_A/lora_B"):
        linearize_lora(frozen)
