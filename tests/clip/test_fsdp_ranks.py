"""FSDP2 (`train.fsdp`: full_shard, shard_grad_op) for the CLIP tasks on two CPU ranks (gloo). torch's `fully_shard`
shards every parameter on dim 0 and refused CLIP's 0-dimensional `logit_scale`; the CLIP tasks now hold such scalars
as 1-element vectors while FSDP2 trains, as under DeepSpeed (clip/dual_encoder.py `hold_scalars_as_vectors`).

Per sharding, one launch trains each CLIP mode's built-in recipe on the tiny CLIP fixture for two steps (zero-shot
head full / LoRA with WiSE-FT / L-LoRA / contrastive with the temperature trainable), then resumes each run from its
checkpoint for a third. Checked as in tests/run/test_fsdp_ranks.py: every step went through an FSDP2 model whose
parameters are DTensor shards after the step, finite losses, the same weights on both ranks, accelerate's FSDP
checkpoint, a resume that trains step 3 only; and the export is what plain transformers loads, with a 0-dim
`logit_scale` (the trained one, for contrastive). Slow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clip.test_deepspeed_ranks import _plain_scale, _same_weights
from tests.run.test_fsdp_ranks import WORKER  # the per-rank runner that records whether each step was FSDP2-sharded

MODES = ("full", "lora", "l_lora", "contrastive")


def _runs(fx: Path) -> dict[str, list[str]]:
    """Mode -> built-in recipe and overrides that train it on the fixtures for a few steps."""
    # colour names as prompts: the folder names (class_0...) give the tiny text tower one embedding for every class
    clip, images = f"model={fx / 'clip'}", [f"data.train={fx / 'images'}", "data.prompt_names=[red,green,blue]"]
    small = ["data.image_size=32", "train.batch_size=4", "data.workers=0", "train.precision=fp32"]
    return {
        "full": ["l-lora", clip, *images, *small, "tune.method=full"],
        "lora": ["cifar-style-lora", clip, *images, *small, f"wise_ft.control={fx / 'images'}"],
        "l_lora": ["l-lora", clip, *images, *small],
        "contrastive": ["mnist-dual-encoder", clip, f"data.train={fx / 'captions.csv'}", *small]
        + ["data.zero_shot=null", "data.zero_shot_class_names=null", "train.logging_steps=1"],
    }


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import write_all, write_data

    out = tmp_path_factory.mktemp("clip-fsdp-fixtures") / "fx"
    with fixture_seed():
        written = write_all(out)
    write_data(out, written["images"])
    return out


def _train(sharding: str, fx: Path, tmp: Path, modes: tuple[str, ...] = MODES) -> Path:
    common = [f"train.fsdp={sharding}", "train.max_steps=2", "train.logging_steps=1"]
    chosen = {mode: argv for mode, argv in _runs(fx).items() if mode in modes}
    runs = [
        {"argv": [*argv, f"output_dir={tmp / mode}", *common], "out": str(tmp / mode)} for mode, argv in chosen.items()
    ]
    for mode, first in chosen.items():  # the same runs, resumed from step 2 to step 3
        (tmp / f"{mode}-resumed").mkdir()
        argv = [*first, f"output_dir={tmp / mode}", *common, "train.max_steps=3", "train.resume=true"]
        runs.append({"argv": argv, "out": str(tmp / f"{mode}-resumed")})
    (tmp / "runs.json").write_text(json.dumps(runs))
    (tmp / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "VISIONTUNE_ERROR_DIR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VISIONTUNE_CACHE=str(tmp / "cache"))
    code = "import sys; from visiontune.run.distributed import run_ranks; sys.exit(run_ranks(2, sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, str(tmp / "worker.py"), str(tmp / "runs.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=tmp)  # a hang is a failure
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return tmp


@pytest.fixture(scope="module", params=["full_shard", "shard_grad_op"])
def trained(request, fixtures, tmp_path_factory) -> tuple[Path, Path]:
    return fixtures, _train(request.param, fixtures, tmp_path_factory.mktemp(request.param))


def _steps(out: Path) -> list[str]:
    steps = [json.loads((out / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] and steps[0] == steps[1], steps
    assert all(s.endswith(" sharded") for s in steps[0]), f"{out.name} trained through {set(steps[0])}, not FSDP2"
    return steps[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_clip_mode_trains_and_resumes_under_fsdp2(trained, mode):
    fx, tmp = trained
    run = tmp / mode
    first, resumed = len(_steps(run)), len(_steps(tmp / f"{mode}-resumed"))
    assert first == 2 * resumed, (first, resumed)  # the resumed run trained step 3 only
    _same_weights(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses), rows  # steps 1, 2 and the resumed 3
    assert json.loads((run / "summary.json").read_text())["global_step"] == 3
    checkpoint = run / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file(), f"{checkpoint}: not accelerate's FSDP checkpoint"
    assert list(checkpoint.glob("optimizer*")), f"{checkpoint} holds no optimiser state"
    scale, fixture_scale = _plain_scale(run / "model"), _plain_scale(fx / "clip")
    if mode == "contrastive":  # the temperature trains there: the trained value, not the starting one, is exported
        assert scale != fixture_scale
    else:
        assert scale == fixture_scale
    if mode == "lora":
        assert (run / "wise_ft_model").is_dir()  # WiSE-FT read the export back
    if mode == "l_lora":
        from visiontune.clip.classify import load_clip_classifier

        assert load_clip_classifier(str(run / "model")).encoder.model.logit_scale.dim() == 0
