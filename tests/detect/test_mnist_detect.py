"""builtin:mnist-detect: boxes are exactly each digit's ink, sets are deterministic and cached, the held-out set
uses only held-out digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visiontune.core.errors import DataError
from visiontune.detect import mnist_detect
from visiontune.detect.data import read_boxes


@pytest.fixture(scope="module")
def digits():
    return mnist_detect._digits(heldout=True)


def test_boxes_are_the_tight_ink_box_and_digits_do_not_overlap(digits):
    rng = np.random.default_rng(0)
    for _ in range(30):
        picks = rng.integers(0, len(digits[0]), size=rng.integers(1, 5))
        canvas, boxes, masks = mnist_detect.render_canvas(rng, [digits[0][i] for i in picks])
        assert canvas.shape == (128, 128, 3) and canvas.dtype == np.uint8
        assert 1 <= len(boxes) == len(masks) <= len(picks)
        for (x0, y0, x1, y1), mask in zip(boxes, masks, strict=True):
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 16 * 0.3 <= max(x1 - x0, y1 - y0) <= 64
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_read_is_deterministic_cached_and_heldout(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    data = read_boxes("builtin:mnist-detect-heldout:12")
    assert data.origin == "builtin:mnist-detect-heldout:12" and len(data) == 12
    assert data.class_names == [str(d) for d in range(10)] and data.category_ids == list(range(10))
    folder = mnist_detect.mnist_detect_dir(heldout=True, count=12)
    assert folder.name == f"mnist-detect-v{mnist_detect.VERSION}-heldout-12"
    first = (folder / "annotations.json").read_bytes()
    again = mnist_detect.write_canvases(tmp_path / "again", heldout=True, count=12, seed=mnist_detect.SEEDS[True])
    assert (again / "annotations.json").read_bytes() == first
    assert (again / "images/00003.png").read_bytes() == (folder / "images/00003.png").read_bytes()
    assert read_boxes("builtin:mnist-detect-heldout:12").records == data.records  # read back from the cache
    labels = {label for r in data.records for label in r.labels}
    assert all(1 <= len(r.boxes) <= 4 for r in data.records) and len(labels) > 3
    coco = json.loads(first)
    assert all(16 * 0.3 <= max(a["bbox"][2:]) <= 64 for a in coco["annotations"])


def test_train_and_heldout_digit_pools_are_disjoint(digits):
    train = mnist_detect._digits(heldout=False)[0].reshape(-1, 28 * 28)
    held = {row.tobytes() for row in digits[0].reshape(-1, 28 * 28)}
    assert len(train) == 4000 and len(digits[0]) == 1000
    assert sum(row.tobytes() in held for row in train) <= 5  # MNIST-5k holds a few byte-identical digits


def test_unknown_builtin_and_classify_use_refused():
    with pytest.raises(DataError, match="built-in datasets"):
        read_boxes("builtin:cifar-detect")
    with pytest.raises(DataError, match="not a detection set"):
        read_boxes("builtin:mnist-5k")
    from visiontune.core.assets import load_digit_arrays

    with pytest.raises(DataError, match="task: detect"):
        load_digit_arrays("mnist-detect")
