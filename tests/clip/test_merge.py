"""Weight-space merging on hand-made state dicts with hand-computed results: WiSE-FT, task vectors, averaging,
task arithmetic and TIES-Merging."""

import pytest
import torch

from visiontune.clip.merge import MERGE_METHODS, average, interpolate, task_arithmetic, task_vectors, ties
from visiontune.core.errors import ModelError, RecipeError


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def offset(base, deltas):
    """A fine-tuned state dict: base + delta for the given keys, everything else copied."""
    return {key: base[key] + deltas[key] if key in deltas else base[key].clone() for key in base}


@pytest.fixture
def zs_ft():
    zero_shot = {"w": t(1.0, -2.0, 4.0), "b": t(0.5), "bn.num_batches_tracked": torch.tensor(0)}
    fine_tuned = {"w": t(3.0, 2.0, 0.0), "b": t(1.5), "bn.num_batches_tracked": torch.tensor(12)}
    return zero_shot, fine_tuned


def test_wise_ft_endpoints_are_exact_and_half_is_midpoint(zs_ft):
    zero_shot, fine_tuned = zs_ft
    # Random values, so that a formula like `zs + alpha * (ft - zs)` would show rounding at alpha 1.
    zero_shot["w"], fine_tuned["w"] = torch.randn(64), torch.randn(64)
    assert torch.equal(interpolate(zero_shot, fine_tuned, 0.0)["w"], zero_shot["w"])
    assert torch.equal(interpolate(zero_shot, fine_tuned, 1.0)["w"], fine_tuned["w"])
    zero_shot["w"], fine_tuned["w"] = t(1.0, -2.0, 4.0), t(3.0, 2.0, 0.0)
    half = interpolate(zero_shot, fine_tuned, 0.5)
    assert torch.equal(half["w"], t(2.0, 0.0, 2.0))
    assert torch.equal(half["b"], t(1.0))
    assert torch.allclose(interpolate(zero_shot, fine_tuned, 0.25)["w"], t(1.5, -1.0, 3.0))


def test_wise_ft_takes_integer_buffers_from_fine_tuned(zs_ft):
    for alpha in (0.0, 0.5, 1.0):
        merged = interpolate(*zs_ft, alpha)
        assert merged["bn.num_batches_tracked"].item() == 12
        assert merged["bn.num_batches_tracked"].dtype == torch.int64


def test_wise_ft_mismatched_keys_and_shapes_name_the_key(zs_ft):
    zero_shot, fine_tuned = zs_ft
    with pytest.raises(ModelError, match="'b'"):
        interpolate(zero_shot, {k: v for k, v in fine_tuned.items() if k != "b"}, 0.5)
    with pytest.raises(ModelError, match="'head.weight'"):
        interpolate(zero_shot, {**fine_tuned, "head.weight": t(1.0)}, 0.5)
    with pytest.raises(ModelError, match=r"'w' has shape \(3,\).*\(4,\)"):
        interpolate(zero_shot, {**fine_tuned, "w": t(1.0, 2.0, 3.0, 4.0)}, 0.5)


def test_task_vectors_are_differences_of_floating_tensors(zs_ft):
    base, fine_tuned = zs_ft
    (vector,) = task_vectors(base, [fine_tuned])
    assert set(vector) == {"w", "b"}  # no meaningful difference of a step counter
    assert torch.equal(vector["w"], t(2.0, 4.0, -4.0))
    assert torch.equal(vector["b"], t(1.0))


def test_average_is_elementwise_mean_with_buffers_from_first():
    sds = [
        {"w": t(1.0, 2.0), "step": torch.tensor(3)},
        {"w": t(3.0, -2.0), "step": torch.tensor(5)},
        {"w": t(5.0, 3.0), "step": torch.tensor(7)},
    ]
    merged = average(sds)
    assert torch.equal(merged["w"], t(3.0, 1.0))
    assert merged["step"].item() == 3


def test_task_arithmetic_adds_scaled_sum_of_task_vectors():
    base = {"w": t(1.0, 1.0, 1.0), "step": torch.tensor(0)}
    fts = [
        offset(base, {"w": t(2.0, 0.0, -4.0)}) | {"step": torch.tensor(9)},
        offset(base, {"w": t(2.0, 6.0, 0.0)}),
    ]
    merged = task_arithmetic(base, fts, scaling=0.5)
    assert torch.equal(merged["w"], t(3.0, 4.0, -1.0))  # 1 + 0.5 * (4, 6, -4)
    assert merged["step"].item() == 0  # buffers from the base
    assert torch.equal(task_arithmetic(base, fts, scaling=0.0)["w"], base["w"])


def test_ties_hand_worked_example():
    # Three task vectors of length 6, density 0.5 -> each keeps its 3 largest-magnitude entries:
    #   tau1 = [ 5, -1,  3, -4,  0,  2]  -> trimmed1 = [5,  0,  3, -4, 0,  0]
    #   tau2 = [-2,  6, -1,  3,  1, -4]  -> trimmed2 = [0,  6,  0,  3, 0, -4]
    #   tau3 = [ 3, -2, -5, -1,  4,  1]  -> trimmed3 = [3,  0, -5,  0, 4,  0]
    # Sum of trimmed values:                          [8,  6, -2, -1, 4, -4]
    # Elected signs:                                  [+,  +,  -,  -, +,  -]
    # Disjoint means over entries with the elected sign:
    #   idx0: (5 + 3) / 2 = 4; idx1: 6; idx2: -5 (tau3's -5 beats tau1's +3 by mass, +3 is dropped);
    #   idx3: -4 (tau2's +3 is dropped); idx4: 4; idx5: -4
    # merged = [4, 6, -5, -4, 4, -4]; with base [10..60] and scaling 0.5: base + [2, 3, -2.5, -2, 2, -2].
    base = {"w": t(10.0, 20.0, 30.0, 40.0, 50.0, 60.0), "bn.num_batches_tracked": torch.tensor(1)}
    taus = [t(5.0, -1.0, 3.0, -4.0, 0.0, 2.0), t(-2.0, 6.0, -1.0, 3.0, 1.0, -4.0), t(3.0, -2.0, -5.0, -1.0, 4.0, 1.0)]
    fts = [offset(base, {"w": tau}) for tau in taus]
    merged = ties(base, fts, scaling=0.5, density=0.5)
    assert torch.equal(merged["w"], t(12.0, 23.0, 27.5, 38.0, 52.0, 58.0))
    assert merged["bn.num_batches_tracked"].item() == 1
    # Task arithmetic on the same vectors differs: it keeps the conflicting mass.
    assert torch.equal(task_arithmetic(base, fts, scaling=1.0)["w"], base["w"] + t(6.0, 3.0, -3.0, -2.0, 5.0, -1.0))


def test_ties_sign_conflicts():
    # density 1 (no trimming): idx0 sums to +1 -> only tau1's +3 agrees -> 3 (task arithmetic would give 1);
    # idx1 sums to exactly 0 -> nothing agrees with a zero sign -> 0.
    base = {"w": t(0.0, 0.0)}
    fts = [offset(base, {"w": tau}) for tau in (t(3.0, 2.0), t(-1.0, -2.0), t(-1.0, 0.0))]
    assert torch.equal(ties(base, fts, scaling=1.0, density=1.0)["w"], t(3.0, 0.0))


def test_ties_trims_per_tensor_and_breaks_magnitude_ties_by_index():
    base = {"small": t(0.0, 0.0), "large": t(0.0, 0.0), "tied": t(0.0, 0.0, 0.0, 0.0), "scalar": torch.tensor(1.0)}
    deltas = {
        "small": t(0.25, 0.5),
        "large": t(8.0, -16.0),
        "tied": t(2.0, -2.0, 2.0, 1.0),
        "scalar": torch.tensor(3.0),
    }
    merged = ties(base, [offset(base, deltas)], scaling=1.0, density=0.5)
    assert torch.equal(merged["small"], t(0.0, 0.5))  # a global trim would have zeroed this tensor
    assert torch.equal(merged["large"], t(0.0, -16.0))
    assert torch.equal(merged["tied"], t(2.0, -2.0, 0.0, 0.0))  # equal magnitudes kept in index order
    assert torch.equal(merged["scalar"], torch.tensor(4.0))  # at least one entry is always kept
    # Large enough that an unstable sort (or topk) would pick an arbitrary half of the equal magnitudes.
    many = {"w": torch.zeros(4096)}
    merged = ties(many, [{"w": t(1.0, -1.0).repeat(2048)}], scaling=1.0, density=0.5)
    assert torch.equal(merged["w"], torch.cat([t(1.0, -1.0).repeat(1024), torch.zeros(2048)]))


def test_merges_check_layout_and_arguments():
    base = {"w": t(0.0, 0.0)}
    good = {"w": t(1.0, 1.0)}
    with pytest.raises(ModelError, match="'w'.*fine-tuned model 2"):
        task_arithmetic(base, [good, {"w": t(1.0)}])
    with pytest.raises(ModelError, match="'extra'.*fine-tuned model 1"):
        ties(base, [{**good, "extra": t(1.0)}])
    with pytest.raises(ModelError, match="'w'.*model 2"):
        average([good, {"v": t(1.0, 1.0)}])
    with pytest.raises(ModelError, match="at least one"):
        task_arithmetic(base, [])
    with pytest.raises(RecipeError, match="density"):
        ties(base, [good], density=0.0)


def test_merge_methods_dispatch_by_name():
    base = {"w": t(0.0, 0.0, 0.0, 0.0)}
    fts = [offset(base, {"w": t(4.0, -1.0, 2.0, 0.0)}), offset(base, {"w": t(-2.0, 3.0, 2.0, 1.0)})]
    assert set(MERGE_METHODS) == {"average", "task_arithmetic", "ties"}
    assert torch.equal(MERGE_METHODS["average"](base, fts)["w"], t(1.0, 1.0, 2.0, 0.5))
    assert torch.equal(MERGE_METHODS["task_arithmetic"](base, fts, scaling=0.5)["w"], t(1.0, 1.0, 2.0, 0.5))
    assert torch.equal(MERGE_METHODS["ties"](base, fts, scaling=1.0, density=1.0)["w"], t(4.0, 3.0, 2.0, 1.0))
    with pytest.raises(ModelError, match="'w'"):
        MERGE_METHODS["average"](base, [{"w": t(1.0)}])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_is_preserved(dtype):
    base = {"w": t(1.0, 2.0, -4.0, 8.0, dtype=dtype), "step": torch.tensor(2)}
    fts = [
        offset(base, {"w": t(2.0, -2.0, 0.0, 4.0, dtype=dtype)}),
        offset(base, {"w": t(2.0, 2.0, 2.0, 0.0, dtype=dtype)}),
    ]
    results = {
        "interpolate": interpolate(base, fts[0], 0.5),
        "average": average(fts),
        "task_arithmetic": task_arithmetic(base, fts, scaling=0.5),
        "ties": ties(base, fts, scaling=1.0, density=0.5),
    }
    expected = {
        "interpolate": t(2.0, 1.0, -4.0, 10.0),
        "average": t(3.0, 2.0, -3.0, 10.0),
        "task_arithmetic": t(3.0, 2.0, -3.0, 10.0),
        # trimmed [2, 0, 0, 4] (the tied 2s keep idx0) and [2, 2, 0, 0] -> [2, 2, 0, 4]
        "ties": t(3.0, 4.0, -4.0, 12.0),
    }
    for name, merged in results.items():
        assert merged["w"].dtype == dtype, name
        assert merged["step"].dtype == torch.int64, name
        assert torch.equal(merged["w"].double(), expected[name].double()), name
    assert all(v.dtype == dtype for v in task_vectors(base, fts)[0].values())
