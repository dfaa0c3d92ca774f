"""DeepSpeed ZeRO-2 and ZeRO-3 for the CLIP tasks on two CPU ranks (gloo). DeepSpeed's engine stopped every rank on
CLIP's 0-dimensional `logit_scale` (it broadcasts parameters viewed as bytes); the CLIP tasks now hold such scalars
as 1-element vectors while DeepSpeed trains and write them back 0-dimensional (clip/dual_encoder.py).

Per backend, one launch trains each CLIP mode's built-in recipe on the tiny CLIP fixture for two steps (zero-shot
head full / LoRA with WiSE-FT / L-LoRA (ZeRO-2; refused under ZeRO-3: tests/clip/test_deepspeed_scalars.py),
contrastive with the temperature trainable), then resumes each run from its checkpoint for a third (clip_continual:
tests/clip/test_continual_deepspeed.py). Checked as in
tests/run/test_sharded_ranks.py: every step went through DeepSpeed's engine, finite losses, the same weights on both
ranks, DeepSpeed checkpoints, a resume that trains step 3 only; and the export is what plain transformers loads,
with a 0-dim `logit_scale` (the trained one, for contrastive). Slow, and needs the `deepspeed` extra."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from tests.run.test_sharded_ranks import WORKER  # noqa: E402  (the per-rank runner, shared with the other tasks)

MODES = ("full", "lora", "l_lora", "contrastive")


def _runs(fx: Path, backend: str) -> dict[str, list[str]]:
    """Mode -> built-in recipe and overrides that train it on the fixtures for a few steps."""
    # colour names as prompts: the folder names (class_0...) give the tiny text tower one embedding for every class
    clip, images = f"model={fx / 'clip'}", [f"data.train={fx / 'images'}", "data.prompt_names=[red,green,blue]"]
    small = ["data.image_size=32", "train.batch_size=4", "data.workers=0", "train.precision=fp32"]
    l_lora = {"l_lora": ["l-lora", clip, *images, *small]} if backend != "zero3" else {}
    return {
        "full": ["l-lora", clip, *images, *small, "tune.method=full"],
        "lora": ["cifar-style-lora", clip, *images, *small, f"wise_ft.control={fx / 'images'}"],
        **l_lora,
        "contrastive": ["mnist-dual-encoder", clip, f"data.train={fx / 'captions.csv'}", *small]
        + ["data.zero_shot=null", "data.zero_shot_class_names=null", "train.logging_steps=1"],
    }


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import write_all, write_data

    out = tmp_path_factory.mktemp("clip-ds-fixtures") / "fx"
    with fixture_seed():
        written = write_all(out)
    write_data(out, written["images"])
    return out


def _train(backend: str, fx: Path, tmp: Path) -> Path:
    common = [f"train.deepspeed={backend}", "train.max_steps=2", "train.logging_steps=1"]
    runs = [
        {"argv": [*argv, f"output_dir={tmp / mode}", *common], "out": str(tmp / mode)}
        for mode, argv in _runs(fx, backend).items()
    ]
    for mode, first in _runs(fx, backend).items():  # the same runs, resumed from step 2 to step 3
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


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def trained(request, fixtures, tmp_path_factory) -> tuple[Path, Path]:
    return fixtures, _train(request.param, fixtures, tmp_path_factory.mktemp(request.param))


def _steps(out: Path) -> list[str]:
    steps = [json.loads((out / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] and steps[0] == steps[1], steps
    assert set(steps[0]) == {"DeepSpeedEngine"}, f"{out.name} trained through {set(steps[0])}, not DeepSpeed"
    return steps[0]


def _same_weights(folder: Path) -> None:
    ranks = [json.loads((folder / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["samples_seen"] > 0 for r in ranks), ranks
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], f"{folder}: the ranks ended with other weights"


def _plain_scale(model_dir: Path) -> float:
    """The exported temperature, read by plain transformers: a 0-dim tensor, as CLIPModel holds it."""
    from safetensors import safe_open
    from transformers import CLIPModel

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert f.get_slice("logit_scale").get_shape() == [], "the export keeps the 1-element training shape"
    scale = CLIPModel.from_pretrained(model_dir).logit_scale
    assert scale.dim() == 0
    return float(scale)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_clip_mode_trains_and_resumes_under_deepspeed(trained, mode):
    fx, tmp = trained
    if mode == "l_lora" and tmp.name.startswith("zero3"):
        pytest.skip("L-LoRA is refused under ZeRO-3 (no jvp for DeepSpeed's autograd functions)")
    run = tmp / mode
    first, resumed = len(_steps(run)), len(_steps(tmp / f"{mode}-resumed"))
    assert first == 2 * resumed, (first, resumed)  # the resumed run trained step 3 only
    _same_weights(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses), rows  # steps 1, 2 and the resumed 3
    assert json.loads((run / "summary.json").read_text())["global_step"] == 3
    assert (run / "checkpoints" / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's own checkpoint layout
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
