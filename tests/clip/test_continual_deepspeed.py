"""clip_continual under DeepSpeed ZeRO-2 on two CPU ranks (gloo). Each task of the sequence trains with a new
Trainer, and accelerate refused the second task's DeepSpeed Accelerator while the first one's state lived; the staged
runner now drops that state before each stage (run/stages.py `forget_deepspeed_accelerator`). ZeRO-3 stays refused
(tests/run/test_sharding_config.py).

One launch trains a two-task sequence (the tiny CLIP fixture, full fine-tuning of the vision tower, two steps per
task). Checked: every step of both tasks went through DeepSpeed's engine, finite losses in each task,
the same weights on both ranks after each task, each task's DeepSpeed checkpoint, the accuracy matrix filled, and an
export that plain transformers loads with a 0-dim `logit_scale`. Slow, and needs the `deepspeed` extra."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from tests.clip.test_deepspeed_ranks import _plain_scale, _same_weights  # noqa: E402
from tests.run.test_sharded_ranks import WORKER  # noqa: E402  (the per-rank runner, shared with the other tasks)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import write_all, write_data

    out = tmp_path_factory.mktemp("clip-continual-ds-fixtures") / "fx"
    with fixture_seed():
        written = write_all(out)
    write_data(out, written["images"])
    return out


def _sequence(fx: Path, out: Path, backend: str) -> dict:
    colours = ["red", "green", "blue"]  # the folder names (class_0...) give the tiny text tower one embedding
    return {
        "task": "clip_continual",
        "model": str(fx / "clip"),
        "output_dir": str(out),
        "tasks": [{"name": n, "train": str(fx / "images"), "prompt_names": colours} for n in ("first", "second")],
        "data": {"templates": ["a photo of a {}"], "val_split": 0.25, "workers": 0, "image_size": 32},
        "tune": {"method": "full"},
        "train": {"batch_size": 4, "lr": 1e-3, "logging_steps": 1, "precision": "fp32", "max_steps": 2}
        | {"deepspeed": backend},
    }


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2"])  # zero3 is refused: tests/run/test_sharding_config.py
def test_clip_continual_trains_under_deepspeed(fixtures, tmp_path, backend):
    import yaml

    run = tmp_path / "run"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_sequence(fixtures, run, backend)))
    (tmp_path / "runs.json").write_text(json.dumps([{"argv": [str(tmp_path / "recipe.yaml")], "out": str(tmp_path)}]))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "VISIONTUNE_ERROR_DIR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VISIONTUNE_CACHE=str(tmp_path / "cache"))
    code = "import sys; from visiontune.run.distributed import run_ranks; sys.exit(run_ranks(2, sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, str(tmp_path / "worker.py"), str(tmp_path / "runs.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # a hang fails
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    steps = [json.loads((tmp_path / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] == ["DeepSpeedEngine"] * 4, steps  # two steps of each task, both through the engine
    for folder in sorted((run / "stages").glob("*-*")):
        _same_weights(folder)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) >= 2 and all(math.isfinite(v) for v in losses), rows
        assert (folder / "checkpoints" / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's checkpoint layout
    result = json.loads((run / "eval" / "continual.json").read_text())
    assert result["tasks"] == ["first", "second"] and all(v is not None for v in result["matrix"][1])
    assert _plain_scale(run / "model") == _plain_scale(fixtures / "clip")  # the zero-shot head's temperature is frozen
