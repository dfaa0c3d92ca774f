"""The built-in segmentation recipe on real weights and real digits (minutes): `make test-slow`."""

import json

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_mnist_fpn_lite0_reaches_080_miou_on_held_out_digits(cli, tmp_path):
    run = tmp_path / "mnist-fpn-lite0"
    code, _, err = cli("train", REPO / "src/visiontune/recipes/segment/mnist-fpn-lite0.yaml", f"output_dir={run}")
    assert code == 0, err
    before = json.loads((run / "eval/before.json").read_text())["metrics"]["miou"]
    after = json.loads((run / "eval/after.json").read_text())
    assert after["metrics"]["miou"] >= 0.80 > before  # over the 11 classes, on canvases of held-out digits
    assert len(after["per_class_iou"]) == 11 and (run / "plots" / "masks.png").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_time_s"] <= 20 * 60
