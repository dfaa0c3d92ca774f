"""The helpers that compare two models' predictions (tests/conftest.py) forgive a different choice at a near-tie of
the logits, where float rounding decides, and nowhere else."""

import types

import pytest
import torch

from tests.conftest import assert_same_greedy, assert_same_predictions


def test_predictions_may_differ_only_where_the_logits_tie():
    expected = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0 + 1e-6, 0.0]])
    assert_same_predictions(expected, torch.tensor([[2.0, 1.0, 0.0], [1.0 + 1e-6, 1.0, 0.0]]), atol=1e-5)
    with pytest.raises(AssertionError):  # a clear row predicted otherwise
        assert_same_predictions(expected, torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 0.0]]), atol=1e-5)
    with pytest.raises(AssertionError, match="near-tie"):  # nothing decided, nothing shown
        assert_same_predictions(expected[1:], expected[1:], atol=1e-5)


def _generated(tokens: list[int], logits: list[list[float]]):
    """What `generate(..., output_logits=True, return_dict_in_generate=True)` returns for prompt [9] + tokens."""
    return types.SimpleNamespace(sequences=torch.tensor([[9, *tokens]]), logits=[torch.tensor([r]) for r in logits])


def test_greedy_answers_may_part_only_at_a_tie():
    theirs = _generated([1, 0], [[0.0, 1.0, 0.5], [1.0, 1.0 - 1e-6, 0.0]])
    assert_same_greedy(torch.tensor([[9, 1, 0]]), theirs, 1, tol=1e-5)
    assert_same_greedy(torch.tensor([[9, 1, 1, 2]]), theirs, 1, tol=1e-5)  # parted at the tie: the rest shows nothing
    with pytest.raises(AssertionError, match="new token 0"):  # their token 1 beat token 2 by 0.5
        assert_same_greedy(torch.tensor([[9, 2, 0]]), theirs, 1, tol=1e-5)
    with pytest.raises(AssertionError):  # one answer stops early
        assert_same_greedy(torch.tensor([[9, 1]]), theirs, 1, tol=1e-5)
