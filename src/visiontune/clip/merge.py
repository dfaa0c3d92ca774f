"""Weight-space operations on state dicts of models fine-tuned from the same base: WiSE-FT interpolation, task
vectors, averaging (model soups), task arithmetic and TIES-Merging. Pure torch; loading and saving models is the
caller's job.

Floating tensors are combined in at least float32, so bf16 weights keep the small differences a task vector is
made of, and each result is cast back to its tensor's dtype. Non-floating tensors (BatchNorm
`num_batches_tracked`, integer buffers such as position ids) are never averaged: each function says which model
they are copied from."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from visiontune.core.errors import ModelError, RecipeError

StateDict = dict[str, torch.Tensor]


def interpolate(zero_shot: StateDict, fine_tuned: StateDict, alpha: float) -> StateDict:
    """WiSE-FT (Wortsman et al., CVPR 2022): `(1 - alpha) * zero_shot + alpha * fine_tuned` for floating tensors.

    Alpha 0 returns the zero-shot weights and 1 the fine-tuned ones, both exactly; values outside [0, 1]
    extrapolate. Non-floating tensors are copied from the fine-tuned model.

    Args:
        zero_shot: Weights of the model before fine-tuning.
        fine_tuned: Weights of the same architecture after fine-tuning.
        alpha: Weight of the fine-tuned model.

    Returns:
        A new state dict in the key order of `zero_shot`, each tensor in the fine-tuned tensor's dtype.

    Raises:
        ModelError: The two state dicts differ in keys or shapes.
    """
    _check_same_layout(zero_shot, fine_tuned, "the zero-shot model", "the fine-tuned model")

    def lerp(key: str, end: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # lerp uses `end - (end - start) * (1 - w)` for w >= 0.5, so both endpoints come back bit-exact.
        return torch.lerp(zero_shot[key].to(end.device, dtype), end.to(dtype), alpha)

    return _per_tensor(zero_shot, fine_tuned, lerp)


def task_vectors(base: StateDict, fine_tuned_list: Sequence[StateDict]) -> list[StateDict]:
    """Task vectors (Ilharco et al., ICLR 2023): `tau_i = fine_tuned_i - base` for every floating tensor.

    Non-floating tensors have no meaningful difference and are left out.

    Args:
        base: Weights the models were fine-tuned from.
        fine_tuned_list: Weights of each fine-tuned model.

    Returns:
        One state dict per fine-tuned model, each tensor in that model's dtype.

    Raises:
        ModelError: The list is empty, or a model differs from the base in keys or shapes.
    """
    _check_all_against_base(base, fine_tuned_list)
    vectors = []
    for fine_tuned in fine_tuned_list:
        vector = {}
        for key, theta in base.items():
            if theta.is_floating_point():
                vector[key] = _delta(theta, fine_tuned[key], _compute_dtype(theta)).to(fine_tuned[key].dtype)
        vectors.append(vector)
    return vectors


def average(state_dicts: Sequence[StateDict]) -> StateDict:
    """Uniform model soup (Wortsman et al., ICML 2022): the mean of every floating tensor.

    Non-floating tensors are copied from the first state dict.

    Args:
        state_dicts: Weights of models fine-tuned from the same base.

    Returns:
        A new state dict in the key order and dtypes of the first state dict.

    Raises:
        ModelError: The list is empty, or a state dict differs from the first in keys or shapes.
    """
    if not state_dicts:
        raise ModelError("Averaging needs at least one state dict; pass one or more fine-tuned checkpoints.")
    first = state_dicts[0]
    for index, other in enumerate(state_dicts[1:], start=2):
        _check_same_layout(first, other, "model 1", f"model {index}")

    def mean(key: str, reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([sd[key].to(reference.device, dtype) for sd in state_dicts]).mean(0)

    return _per_tensor(first, first, mean)


def task_arithmetic(base: StateDict, fine_tuned_list: Sequence[StateDict], *, scaling: float = 0.3) -> StateDict:
    """Task arithmetic (Ilharco et al., ICLR 2023): `base + scaling * sum_i tau_i`.

    Non-floating tensors are copied from the base.

    Args:
        base: Weights the models were fine-tuned from.
        fine_tuned_list: Weights of each fine-tuned model.
        scaling: Lambda applied to the summed task vectors; 0.3 to 0.5 is the usual range found on validation
            data when adding several tasks.

    Returns:
        A new state dict in the key order and dtypes of the base.

    Raises:
        ModelError: The list is empty, or a model differs from the base in keys or shapes.
    """
    return _merge_task_vectors(base, fine_tuned_list, lambda taus: scaling * taus.sum(0))


def ties(
    base: StateDict, fine_tuned_list: Sequence[StateDict], *, scaling: float = 1.0, density: float = 0.2
) -> StateDict:
    """TIES-Merging (Yadav et al., NeurIPS 2023): `base + scaling * merged`, where per tensor:

    1. Trim: each task vector `tau_i = fine_tuned_i - base` keeps its `round(density * numel)` entries of largest
       magnitude (at least one) and zeros the rest. Equal magnitudes at the cut are kept in index order, so the
       result does not depend on the sort implementation.
    2. Elect: the sign of each parameter is the sign of the sum of the trimmed values (total mass, not a vote).
    3. Disjoint merge: each parameter is the mean of the trimmed values that are non-zero and have the elected
       sign; where none has (including a sum of exactly zero) it is 0.

    Non-floating tensors are copied from the base.

    Args:
        base: Weights the models were fine-tuned from.
        fine_tuned_list: Weights of each fine-tuned model.
        scaling: Lambda applied to the merged task vector (the paper's default is 1).
        density: Fraction of each task vector's entries kept by trimming, in (0, 1] (the paper's default is 0.2).

    Returns:
        A new state dict in the key order and dtypes of the base.

    Raises:
        ModelError: The list is empty, or a model differs from the base in keys or shapes.
        RecipeError: `density` is outside (0, 1].
    """
    if not 0 < density <= 1:
        raise RecipeError(f"TIES density must be in (0, 1], got {density}; pass the fraction of entries to keep.")
    return _merge_task_vectors(base, fine_tuned_list, lambda taus: scaling * _ties_combine(taus, density))


def _average_with_base(base: StateDict, fine_tuned_list: Sequence[StateDict]) -> StateDict:
    """`average` behind the uniform merge signature; the base is only checked against, not averaged in."""
    _check_all_against_base(base, fine_tuned_list)
    return average(fine_tuned_list)


# Uniform signature `(base, fine_tuned_list, **options) -> state_dict` so the CLI can dispatch on the name.
MERGE_METHODS: dict[str, Callable[..., StateDict]] = {
    "average": _average_with_base,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
}


def _ties_combine(taus: torch.Tensor, density: float) -> torch.Tensor:
    """Trim, elect and disjoint-merge stacked task vectors [n, *shape] into one tensor of `shape`."""
    flat = taus.reshape(len(taus), -1)  # also turns 0-d tensors (e.g. CLIP's logit_scale) into one column
    trimmed = _trim(flat, density)
    elected = torch.sign(trimmed.sum(0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    kept_sum = torch.where(agrees, trimmed, 0).sum(0)
    merged = kept_sum / agrees.sum(0).clamp(min=1)
    return merged.reshape(taus.shape[1:])


def _trim(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the top `density` fraction by magnitude of each row; equal magnitudes kept in index order."""
    numel = flat.shape[1]
    keep_count = min(numel, max(1, math.floor(density * numel + 0.5)))
    # A stable descending sort keeps equal magnitudes in index order: topk gives no such guarantee.
    order = flat.abs().argsort(dim=1, descending=True, stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, :keep_count], True)
    return torch.where(keep, flat, 0)


def _merge_task_vectors(
    base: StateDict, fine_tuned_list: Sequence[StateDict], combine: Callable[[torch.Tensor], torch.Tensor]
) -> StateDict:
    """`base + combine(stacked task vectors)` per floating tensor."""
    _check_all_against_base(base, fine_tuned_list)

    def add(key: str, theta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        taus = torch.stack([_delta(theta, fine_tuned[key], dtype) for fine_tuned in fine_tuned_list])
        return theta.to(dtype) + combine(taus)

    return _per_tensor(base, base, add)


def _per_tensor(
    order: StateDict, source: StateDict, combine: Callable[[str, torch.Tensor, torch.dtype], torch.Tensor]
) -> StateDict:
    """The one per-tensor loop, in `order`'s key order and one tensor at a time to bound memory: each floating
    tensor of `source` becomes `combine(key, tensor, compute dtype)` cast back to its dtype; the others are cloned."""
    merged = {}
    for key in order:
        tensor = source[key]
        if tensor.is_floating_point():
            merged[key] = combine(key, tensor, _compute_dtype(tensor)).to(tensor.dtype)
        else:
            merged[key] = tensor.clone()
    return merged


def _delta(theta: torch.Tensor, other: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return other.to(theta.device, dtype) - theta.to(dtype)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """At least float32 (bf16/fp16 sums lose small task-vector entries); float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_all_against_base(base: StateDict, fine_tuned_list: Sequence[StateDict]) -> None:
    if not fine_tuned_list:
        raise ModelError("Merging needs at least one fine-tuned model; pass one or more fine-tuned checkpoints.")
    for index, fine_tuned in enumerate(fine_tuned_list, start=1):
        _check_same_layout(base, fine_tuned, "the base model", f"fine-tuned model {index}")


def _check_same_layout(reference: StateDict, other: StateDict, reference_name: str, other_name: str) -> None:
    """Raise on the first key (in the reference's order, then the other's) that is missing or has another shape."""
    for key, tensor in reference.items():
        if key not in other:
            raise ModelError(
                f"Key '{key}' is in {reference_name} but not in {other_name}; "
                "merge only models fine-tuned from the same base model."
            )
        if other[key].shape != tensor.shape:
            raise ModelError(
                f"Key '{key}' has shape {tuple(tensor.shape)} in {reference_name} but {tuple(other[key].shape)} "
                f"in {other_name}; merge only models with the same architecture and head size."
            )
    extra = next((key for key in other if key not in reference), None)
    if extra is not None:
        raise ModelError(
            f"Key '{extra}' is in {other_name} but not in {reference_name}; "
            "merge only models fine-tuned from the same base model."
        )
