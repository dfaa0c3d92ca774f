"""Shared fixtures: tiny models saved to local folders (built once per session) and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Tokenisation caches and bad-sample reports of the tests stay out of the user's ~/.cache.
os.environ.setdefault("VISIONTUNE_CACHE", tempfile.mkdtemp(prefix="visiontune-test-cache-"))

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def fixture_seed():
    """Tiny models built inside get the same weights whichever test asks for them first, and the RNG is left as it
    was. Not seed 0, which tests build their own models with (a fresh init of the tiny ViT would equal the fixture's,
    and `pretrained: false` would change nothing)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(1705)
        yield


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    from visiontune.testing.fixtures import write_all

    out = tmp_path_factory.mktemp("fixtures")
    with fixture_seed():
        write_all(out)
    return out


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(dict) -> path of a YAML recipe in tmp_path."""

    def write(config: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture
def tiny_recipe(fixtures_dir, tmp_path):
    """A fast classify recipe on the tiny timm ViT and the generated image folder."""

    def make(**sections) -> dict:
        config = {
            "task": "classify",
            "model": str(fixtures_dir / "timm-vit"),
            "output_dir": str(tmp_path / "run"),
            "data": {
                "train": str(fixtures_dir / "images"),
                "val_split": 0.25,
                "augment": {"preset": "none"},
                "workers": 0,
            },
            "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "logging_steps": 1, "warmup_ratio": 0.0},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
        return config

    return make


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `visiontune ARGS` in-process; returns (exit code, stdout, stderr)."""
    from visiontune.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["visiontune", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def train_two_ranks(recipe: Path) -> list[dict]:
    """`visiontune train RECIPE --nproc 2` in a subprocess; returns the two ranks' `ranks/rank{R}.json` records."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "visiontune", "train", str(recipe), "--nproc", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    return [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


# Random tiny models decide nothing by their argmax: where two logits lie within float rounding of each other, which
# one wins depends on the CPU's kernels (ATEN_CPU_CAPABILITY), the batch size and what ran before. Comparisons of two
# models' predictions go through these two helpers, which accept a different choice only at such a tie.


def assert_same_predictions(expected, actual, atol: float) -> None:
    """Logits within `atol`: so the same top class in every row whose top two logits are more than 2·atol apart (a
    closer row is a tie float rounding breaks either way, its argmax no evidence), and some row must be that clear."""
    import torch

    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
    top = expected.topk(2, dim=-1).values
    assert (top[..., 0] - top[..., 1] > 2 * atol).any(), "every row is a near-tie: the logits decide no prediction"


def assert_same_greedy(ours, theirs, prompt_length: int, tol: float) -> None:
    """Greedy answers of two models whose logits agree within `tol`: `ours` (prompt + new ids) equals
    `theirs.sequences` (from `generate(..., output_logits=True, return_dict_in_generate=True)`), or parts from it only
    at a step where their logits of the two tokens lie within 2·tol, a tie (the tokens after it show nothing)."""
    a, b = ours[0, prompt_length:].tolist(), theirs.sequences[0, prompt_length:].tolist()
    for step, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            gap = float(theirs.logits[step][0, y] - theirs.logits[step][0, x])
            assert gap <= 2 * tol, f"new token {step}: ours {x}, theirs {y}, {gap:.2e} apart in their logits"
            return
    assert len(a) == len(b), (a, b)
