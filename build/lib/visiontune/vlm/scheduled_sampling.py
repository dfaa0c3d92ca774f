"""Scheduled sampling (Bengio et al., NeurIPS 2015, "Scheduled Sampling for Sequence Prediction with Recurrent
Neural Networks"): during training, feed the language model its own previous prediction instead of the
ground-truth token with probability 1 - ratio, and lower the teacher-forcing ratio over training, so the model
learns to continue from its own mistakes as it must at generation time.

Cost: a transformer predicts all positions at once, so the predictions come from a first teacher-forced forward
pass under `torch.no_grad()` (the parallel form of Duckworth et al., 2019, and Mihaylova & Martins, 2019, rather
than Bengio's token-by-token decoding). Each step therefore costs a second forward pass (no second backward).

Off by default: nothing here runs unless the trainer is given a schedule, and a ratio of 1 leaves the inputs
untouched. One step, in the trainer:

    ratio = teacher_forcing_ratio(step, total_steps, "inverse_sigmoid")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(dim=-1)  # [B, T]
    batch["input_ids"] = mix_inputs(batch["input_ids"], predicted, batch["labels"], ratio, generator)
    loss = model(**batch).loss  # targets (labels) stay the ground truth
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from visiontune.core.errors import ModelError, RecipeError

__all__ = ["IGNORE_INDEX", "SCHEDULES", "mix_inputs", "teacher_forcing_ratio"]

IGNORE_INDEX = -100  # label of positions without loss (prompt, image tokens, padding), as in transformers


def _linear(step: int, total_steps: int, start: float, end: float, k: float | None) -> float:
    return start + (end - start) * min(step / total_steps, 1.0)


def _exponential(step: int, total_steps: int, start: float, end: float, k: float | None) -> float:
    if k is None:
        # start·k^step never reaches 0, so with end = 0 the default aims at 1 % of start at total_steps instead.
        target = max(end, 0.01 * start)
        k = (target / start) ** (1 / total_steps) if start > 0 else 0.0
    return max(end, start * k**step)


def _inverse_sigmoid(step: int, total_steps: int, start: float, end: float, k: float | None) -> float:
    k = _midpoint_k(total_steps) if k is None else k

    def raw(i: float) -> float:  # k / (k + exp(i/k)) written as a sigmoid, which cannot overflow for large i/k
        return 0.5 * (1.0 + math.tanh((math.log(k) - i / k) / 2))

    share = (raw(min(step, total_steps)) - raw(total_steps)) / (raw(0) - raw(total_steps))  # 1 → 0 over the run
    return end + (start - end) * share


def _midpoint_k(total_steps: int) -> float:
    """The k with k·ln k = total_steps / 2: there exp(i/k) = k, so the inverse sigmoid crosses its midpoint half-way.

    Newton's method on the convex k·ln k - c, started right of the root, decreases monotonically onto it.
    """
    c = total_steps / 2
    k = c + 1.0
    for _ in range(100):
        step = (k * math.log(k) - c) / (math.log(k) + 1)
        k -= step
        if abs(step) < 1e-12 * k:
            break
    return k


SCHEDULES: dict[str, Callable[[int, int, float, float, float | None], float]] = {
    "linear": _linear,
    "exponential": _exponential,
    "inverse_sigmoid": _inverse_sigmoid,
}
_K_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "exponential": ("0 < k <= 1", lambda k: 0.0 < k <= 1.0),
    "inverse_sigmoid": ("k > 0", lambda k: k > 0.0),
}


def teacher_forcing_ratio(
    step: int,
    total_steps: int,
    schedule: str,
    start: float = 1.0,
    end: float = 0.0,
    k: float | None = None,
) -> float:
    """Probability of feeding the ground-truth token at `step` (Bengio et al.'s ε_i), going from `start` to `end`.

    Schedules:
    - `linear`: start + (end - start) · step / total_steps, then `end`.
    - `exponential`: max(end, start · k^step). Default k = (max(end, 0.01·start) / start)^(1/total_steps), so it
      reaches `end` at total_steps, or 1 % of `start` when end = 0 (which k^step only approaches); it keeps
      decaying, clipped at `end`, after total_steps.
    - `inverse_sigmoid`: k / (k + exp(step/k)), rescaled so step 0 gives `start` and total_steps gives `end`, then
      `end`. k (in steps) sets how late and how sharp the drop is; the default solves k·ln k = total_steps / 2,
      which puts the midpoint (start + end) / 2 exactly at total_steps / 2.

    Args:
        step: Optimizer step, from 0.
        total_steps: Length of the schedule (usually the run's total steps).
        schedule: A key of `SCHEDULES`.
        start: Ratio at step 0.
        end: Final ratio; 0 <= end <= start <= 1.
        k: Schedule constant (unused by `linear`); None for the defaults above.

    Raises:
        RecipeError: Unknown schedule, or an argument out of range.
    """
    _check_schedule(step, total_steps, schedule, start, end, k)
    return SCHEDULES[schedule](step, total_steps, start, end, k)


def _check_schedule(step: int, total_steps: int, schedule: str, start: float, end: float, k: float | None) -> None:
    if schedule not in SCHEDULES:
        raise RecipeError(f"scheduled sampling schedule is `{schedule}` but must be one of {list(SCHEDULES)}.")
    if total_steps < 1 or step < 0:
        raise RecipeError(f"scheduled sampling needs step >= 0 and total_steps >= 1 but got {step} and {total_steps}.")
    if not 0.0 <= end <= start <= 1.0:
        raise RecipeError(f"scheduled sampling needs 0 <= end <= start <= 1 but got start={start} and end={end}.")
    if k is not None and schedule in _K_RANGES and not _K_RANGES[schedule][1](k):
        raise RecipeError(f"scheduled sampling `{schedule}` needs {_K_RANGES[schedule][0]} but got k={k}.")


def mix_inputs(
    input_ids: Tensor,
    predicted_ids: Tensor,
    labels: Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Inputs for the second forward: each trained position takes the model's own prediction w.p. 1 - ratio.

    Alignment follows transformers' causal LMs, where `labels` equal `input_ids` at trained positions and the model
    shifts them: `predicted_ids[:, t]` (argmax of logits[:, t]) is the prediction for position t + 1, so position t
    takes `predicted_ids[:, t - 1]`. Only positions with a label (!= -100) and a previous position (t >= 1) are
    eligible: prompt, image and padding tokens are never replaced, since the model never generates them.

    Args:
        input_ids: Ground-truth inputs [B, T].
        predicted_ids: Argmax predictions of a teacher-forced forward pass on `input_ids` [B, T].
        labels: Targets [B, T], -100 where no loss is taken.
        ratio: Teacher-forcing probability (from `teacher_forcing_ratio`); 1 returns the inputs unchanged.
        generator: Seeds the draws; must live on the inputs' device.

    Returns:
        A new [B, T] tensor; the arguments are not modified.
    """
    if not input_ids.shape == predicted_ids.shape == labels.shape:
        raise ModelError(
            f"scheduled sampling needs input_ids, predicted_ids and labels of one shape but got "
            f"{list(input_ids.shape)}, {list(predicted_ids.shape)} and {list(labels.shape)}."
        )
    if not 0.0 <= ratio <= 1.0:
        raise RecipeError(f"scheduled sampling ratio must be in [0, 1] but got {ratio}.")
    eligible = labels != IGNORE_INDEX  # [B, T]
    eligible[:, 0] = False  # no previous prediction to feed
    previous = torch.cat([input_ids[:, :1], predicted_ids[:, :-1]], dim=1)  # [B, T]: prediction made for t
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # [B, T]
    return torch.where(eligible & (draw >= ratio), previous.to(input_ids.dtype), input_ids)  # P(draw >= r) = 1 - r
