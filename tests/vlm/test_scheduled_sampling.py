"""Scheduled sampling: each schedule against hand values at start / middle / end, and `mix_inputs` replacing only
trained positions that have a previous one, at the rate 1 - ratio."""

from __future__ import annotations

import math

import pytest
import torch

from visiontune.core.errors import ModelError, RecipeError
from visiontune.vlm.scheduled_sampling import SCHEDULES, mix_inputs, teacher_forcing_ratio

T = 100


@pytest.mark.parametrize(
    ("schedule", "start", "end", "k", "expected"),
    [
        ("linear", 1.0, 0.0, None, {0: 1.0, 50: 0.5, 100: 0.0, 150: 0.0}),
        ("linear", 0.9, 0.1, None, {0: 0.9, 25: 0.7, 100: 0.1}),
        ("exponential", 1.0, 0.0, None, {0: 1.0, 50: 0.1, 100: 0.01}),  # k = 0.01^(1/100)
        ("exponential", 1.0, 0.2, None, {0: 1.0, 50: math.sqrt(0.2), 100: 0.2, 300: 0.2}),  # k = 0.2^(1/100)
        ("exponential", 1.0, 0.5, 0.9, {0: 1.0, 2: 0.81, 100: 0.5}),  # 0.9^100 clipped at end
        ("inverse_sigmoid", 1.0, 0.0, None, {0: 1.0, 50: 0.5, 100: 0.0, 200: 0.0}),
        ("inverse_sigmoid", 0.8, 0.2, None, {0: 0.8, 50: 0.5, 100: 0.2}),
    ],
)
def test_schedule_hand_values(schedule: str, start: float, end: float, k: float | None, expected: dict) -> None:
    for step, value in expected.items():
        assert teacher_forcing_ratio(step, T, schedule, start, end, k) == pytest.approx(value, abs=1e-9), step


def test_inverse_sigmoid_with_explicit_k_is_bengio_rescaled() -> None:
    k = 10.0
    bengio = [k / (k + math.exp(i / k)) for i in (0, 30, T)]
    share = (bengio[1] - bengio[2]) / (bengio[0] - bengio[2])
    assert teacher_forcing_ratio(30, T, "inverse_sigmoid", k=k) == pytest.approx(share)
    assert teacher_forcing_ratio(10**6, 10**6, "inverse_sigmoid", k=1.0) == pytest.approx(0.0)  # no overflow


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_decrease_from_start_to_end(schedule: str) -> None:
    ratios = [teacher_forcing_ratio(step, T, schedule) for step in range(T + 1)]
    assert ratios[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(ratios, ratios[1:], strict=False))


def test_schedule_errors_name_the_values() -> None:
    with pytest.raises(RecipeError, match="`cosine`.*linear"):
        teacher_forcing_ratio(0, T, "cosine")
    with pytest.raises(RecipeError, match="start=0.2 and end=0.5"):
        teacher_forcing_ratio(0, T, "linear", start=0.2, end=0.5)
    with pytest.raises(RecipeError, match="0 < k <= 1 but got k=1.5"):
        teacher_forcing_ratio(0, T, "exponential", k=1.5)


def _batch(b: int = 64, t: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs 0..999, predictions 1000+ (so a replacement is visible), prompt half unlabelled, trained position 0."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 1000, (b, t), generator=gen)
    predicted = torch.randint(1000, 2000, (b, t), generator=gen)
    labels = input_ids.clone()
    labels[:, 1 : t // 2] = -100
    return input_ids, predicted, labels


def test_ratio_one_keeps_inputs() -> None:
    input_ids, predicted, labels = _batch()
    out = mix_inputs(input_ids, predicted, labels, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, input_ids)


def test_ratio_zero_feeds_previous_predictions_at_trained_positions_only() -> None:
    input_ids, predicted, labels = _batch()
    before = input_ids.clone()
    out = mix_inputs(input_ids, predicted, labels, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(input_ids, before)  # not modified in place
    eligible = labels != -100
    eligible[:, 0] = False
    assert torch.equal(out[eligible], predicted[:, :-1][eligible[:, 1:]])  # position t gets prediction t - 1
    assert torch.equal(out[~eligible], input_ids[~eligible])  # first and untrained positions untouched
    assert torch.equal(out[:, 0], input_ids[:, 0])  # labelled, but has no previous prediction


def test_replacement_rate_is_one_minus_ratio() -> None:
    gen = torch.Generator().manual_seed(0)
    replaced = eligible_total = 0
    for seed in range(10):
        input_ids, predicted, labels = _batch(seed=seed)
        out = mix_inputs(input_ids, predicted, labels, 0.3, gen)
        trained = labels != -100
        trained[:, 0] = False
        assert torch.equal(out[~trained], input_ids[~trained])
        replaced += (out[trained] >= 1000).sum().item()
        eligible_total += trained.sum().item()
    assert replaced / eligible_total == pytest.approx(0.7, abs=0.02)  # ~20k draws: std ≈ 0.003


def test_mix_inputs_is_reproducible_with_a_seeded_generator() -> None:
    input_ids, predicted, labels = _batch()
    first = mix_inputs(input_ids, predicted, labels, 0.5, torch.Generator().manual_seed(7))
    second = mix_inputs(input_ids, predicted, labels, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_mix_inputs_errors() -> None:
    input_ids, predicted, labels = _batch()
    with pytest.raises(ModelError, match=r"\[64, 64\], \[64, 63\] and \[64, 64\]"):
        mix_inputs(input_ids, predicted[:, 1:], labels, 0.5)
    with pytest.raises(RecipeError, match="got 1.5"):
        mix_inputs(input_ids, predicted, labels, 1.5)
