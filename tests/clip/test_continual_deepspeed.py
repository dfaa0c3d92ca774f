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
from pathlib import Path

import pytest

from tests import two_ranks

pytest.importorskip("deepspeed")

fixtures_clip = two_ranks.fixtures_clip  # module-scoped: the tiny CLIP fixture and its image folder


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
def test_clip_continual_trains_under_deepspeed(fixtures_clip, tmp_path, backend):
    import yaml

    run = tmp_path / "run"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_sequence(fixtures_clip, run, backend)))
    two_ranks.launch("deepspeed", [{"argv": [str(tmp_path / "recipe.yaml")], "out": str(tmp_path)}], tmp_path, 900)

    steps = [json.loads((tmp_path / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] == ["DeepSpeedEngine"] * 4, steps  # two steps of each task, both through the engine
    for folder in sorted((run / "stages").glob("*-*")):
        two_ranks.same_weights(folder)
        two_ranks.finite_losses(folder, 2)
        two_ranks.engine_checkpoint(folder / "checkpoints" / "checkpoint-2", 2, "deepspeed")
    result = json.loads((run / "eval" / "continual.json").read_text())
    assert result["tasks"] == ["first", "second"] and all(v is not None for v in result["matrix"][1])
    # the zero-shot head's temperature is frozen
    assert two_ranks.plain_scale(run / "model") == two_ranks.plain_scale(fixtures_clip / "clip")
