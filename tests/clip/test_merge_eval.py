"""`visiontune merge` on two tiny CLIP fine-tunes: the merged vision weights follow the chosen method."""

import json
from pathlib import Path

import pytest
import torch

from visiontune.clip.classify import load_clip_classifier


@pytest.fixture(scope="module")
def two_fine_tunes(fixtures_dir, tmp_path_factory):
    import yaml

    from visiontune.cli import main  # noqa: F401  (imported for the same path as the CLI)
    from visiontune.recipe import get_task, parse_config

    runs = []
    for seed, lr in ((1, 5e-3), (2, 1e-2)):
        out = tmp_path_factory.mktemp(f"ft{seed}") / "run"
        cfg = parse_config(
            yaml.safe_load(
                yaml.safe_dump(
                    {
                        "task": "clip_classify",
                        "model": str(fixtures_dir / "clip"),
                        "output_dir": str(out),
                        "seed": seed,
                        "data": {
                            "train": str(fixtures_dir / "images"),
                            "workers": 0,
                            "prompt_names": ["red", "green", "blue"],
                        },
                        "train": {"max_steps": 3, "batch_size": 8, "lr": lr},
                    }
                )
            )
        )
        runs.append(get_task("clip_classify").train(cfg))
    return runs


@pytest.mark.parametrize(
    "method,options",
    [("average", []), ("task_arithmetic", ["--scaling", "0.5"]), ("ties", ["--scaling", "1.0", "--density", "0.5"])],
)
def test_merge_writes_model_and_evaluates(method, options, two_fine_tunes, fixtures_dir, tmp_path, cli):
    out = tmp_path / "merged"
    code, stdout, err = cli(
        "merge",
        fixtures_dir / "clip",
        *two_fine_tunes,
        "--out",
        out,
        "--method",
        method,
        *options,
        "--data",
        fixtures_dir / "images",
    )
    assert code == 0, err
    result = json.loads((out / "merge.json").read_text())
    assert set(result["results"][0]) == {"data", "base (zero-shot)", "fine-tune 1", "fine-tune 2", "merged"}
    merged = load_clip_classifier(str(out), ["red"]).vision_state()
    a, b = (load_clip_classifier(str(r), ["red"]).vision_state() for r in two_fine_tunes)
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    if method == "average":
        torch.testing.assert_close(merged[key], (a[key] + b[key]) / 2)
    elif method == "task_arithmetic":
        base = load_clip_classifier(str(fixtures_dir / "clip"), ["red"]).vision_state()
        torch.testing.assert_close(merged[key], base[key] + 0.5 * ((a[key] - base[key]) + (b[key] - base[key])))
    assert "merged" in stdout


def test_merge_refuses_unknown_method_and_options(two_fine_tunes, fixtures_dir, tmp_path, cli):
    code, _, err = cli("merge", fixtures_dir / "clip", *two_fine_tunes, "--out", tmp_path / "m", "--method", "soup")
    assert code == 2 and "average" in err
    code, _, err = cli(
        "merge",
        fixtures_dir / "clip",
        *two_fine_tunes,
        "--out",
        tmp_path / "m",
        "--method",
        "average",
        "--density",
        "0.3",
    )
    assert code == 2 and "density" in err
    assert not Path(tmp_path / "m").exists()
