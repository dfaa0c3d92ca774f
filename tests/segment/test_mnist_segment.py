"""builtin:mnist-segment: each mask is exactly its canvas's digit ink labelled with the digit, sets are deterministic
and cached by generator version, the held-out set draws only held-out digits."""

from __future__ import annotations

import numpy as np
import pytest

from visiontune.core import canvases
from visiontune.core.errors import DataError
from visiontune.segment import mnist_segment
from visiontune.segment.data import decode_mask, read_masks


@pytest.fixture(scope="module")
def heldout_digits():
    return canvases.digit_pool(heldout=True)


def test_mask_is_the_ink_of_each_digit(heldout_digits):
    digits, labels, _ = heldout_digits
    rng = np.random.default_rng(0)
    for _ in range(30):
        canvas, _, inks, placed = canvases.random_canvas(rng, digits)
        mask = mnist_segment.ink_mask(inks, [int(labels[i]) for i in placed])
        assert mask.shape == canvas.shape[:2] == (128, 128) and mask.dtype == np.uint8
        assert (mask > 0).sum() == sum(int(ink.sum()) for ink in inks)  # digits never overlap
        for ink, i in zip(inks, placed, strict=True):
            assert (mask[ink] == 1 + labels[i]).all()
        ink_pixels = canvas[mask > 0].max(axis=1).astype(int)
        assert np.median(ink_pixels) > np.median(canvas[mask == 0].max(axis=1))  # the ink is what stands out


def test_read_is_deterministic_cached_heldout_and_the_ink(tmp_path, monkeypatch, heldout_digits):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    pools = []
    real_pool = mnist_segment.digit_pool
    monkeypatch.setattr(mnist_segment, "digit_pool", lambda heldout: pools.append(heldout) or real_pool(heldout))
    data = read_masks("builtin:mnist-segment-heldout:12")
    assert pools == [True] and data.origin == "builtin:mnist-segment-heldout:12" and len(data) == 12
    assert data.class_names == ["background", *(str(d) for d in range(10))]
    folder = mnist_segment.mnist_segment_dir(heldout=True, count=12)
    assert folder.name == f"mnist-segment-v{mnist_segment.VERSION}-heldout-12" and pools == [True]  # cached
    again = mnist_segment.write_canvases(tmp_path / "again", heldout=True, count=12, seed=mnist_segment.SEEDS[True])
    for name in ("images/00003.png", "masks/00003.png", "classes.txt"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()
    assert read_masks("builtin:mnist-segment-heldout:12").records == data.records
    # The written masks are the ink of the canvases the seed draws from the held-out digits.
    digits, labels, _ = heldout_digits
    rng = np.random.default_rng(mnist_segment.SEEDS[True])
    for record in data.records:
        _, _, inks, placed = canvases.random_canvas(rng, digits)
        expected = mnist_segment.ink_mask(inks, [int(labels[i]) for i in placed])
        np.testing.assert_array_equal(decode_mask(data, record), expected)
    assert data.pixel_counts[0] > 10 * sum(data.pixel_counts[1:]) > 0


def test_unknown_builtin_and_other_tasks_refused():
    with pytest.raises(DataError, match="not a segmentation set"):
        read_masks("builtin:mnist-detect")
    from visiontune.core.assets import load_digit_arrays

    with pytest.raises(DataError, match="task: segment"):
        load_digit_arrays("mnist-segment-heldout")
