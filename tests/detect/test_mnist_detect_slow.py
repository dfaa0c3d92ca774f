"""The built-in detection recipe on real weights and real digits (EfficientNet-Lite0 + FCOS on builtin:mnist-detect,
scored on canvases of held-out digits): `make test-slow`, minutes on 2 CPU cores."""

import json

import pytest

MAP_50, MAP = 0.95, 0.75  # the target on the held-out canvases


@pytest.mark.slow
def test_mnist_fcos_lite0_finds_held_out_digits(cli, tmp_path):
    run = tmp_path / "mnist-fcos-lite0"
    code, _, err = cli("train", "mnist-fcos-lite0", f"output_dir={run}")
    assert code == 0, err
    before = json.loads((run / "eval" / "before.json").read_text())["metrics"]
    after = json.loads((run / "eval" / "after.json").read_text())["metrics"]
    assert after["map_50"] >= MAP_50 and after["map"] >= MAP, after
    assert after["map"] > before["map"]
    assert (run / "plots" / "detections.png").is_file() and "Per-class AP" in (run / "report.md").read_text()
