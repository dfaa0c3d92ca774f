"""Scaffolding of the slow two-rank sharded tests (DeepSpeed ZeRO and FSDP2 on two CPU ranks, gloo): the per-rank
worker, the built-in recipes that train each task on the tiny fixtures, one launch that trains every run to step 2 and
resumes it to step 3, and the checks every such run gets. `engine` is "deepspeed" or "fsdp" throughout (the recipe
key `train.<engine>` and what the worker and the checks look for). The test files keep their task lists, sharding
settings and extra checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in each rank: `visiontune train NAME OVERRIDES...` for each run in turn (one launch: starting ranks and
# DeepSpeed is most of the time), recording what every training step went through (SPY) in
# OUT/steps-rank{RANK}.json.
_WORKER = """
import gc, json, os, sys
from transformers import Trainer
from visiontune.cli import main

runs = json.loads(open(sys.argv[1]).read())
seen = []
training_step = Trainer.training_step
{spy}
Trainer.training_step = spy
for run in runs:
    seen.clear()
    sys.argv = ["visiontune", "train", *run["argv"]]
    try:
        main()
    except SystemExit as done:  # the CLI exits after each run
        if done.code:
            raise
    with open(os.path.join(run["out"], "steps-rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(seen, f)
{reset}
    gc.collect()
"""

_DEEPSPEED_SPY = """
def spy(self, model, inputs, num_items_in_batch=None):
    seen.append(type(model).__name__)
    return training_step(self, model, inputs, num_items_in_batch)
"""

_FSDP_SPY = """
def spy(self, model, inputs, num_items_in_batch=None):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    loss = training_step(self, model, inputs, num_items_in_batch)
    # after the backward FSDP2 holds every parameter as a shard (a DTensor); DDP would hold whole tensors
    sharded = isinstance(model, FSDPModule) and all(isinstance(p, DTensor) for p in model.parameters())
    seen.append(type(model).__name__ + (" sharded" if sharded else ""))
    return loss
"""

# One run per process is what the CLI does; here the next run must not find this one's settings: accelerate keeps
# its state (with this run's DeepSpeed or FSDP plugin) between Trainers, and transformers a global handle on the
# ZeRO-3 config (models would load partitioned).
_DEEPSPEED_RESET = """
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=False)"""

_FSDP_RESET = """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)"""

WORKERS = {
    "deepspeed": _WORKER.format(spy=_DEEPSPEED_SPY, reset=_DEEPSPEED_RESET),
    "fsdp": _WORKER.format(spy=_FSDP_SPY, reset=_FSDP_RESET),
}


def task_runs(fx: Path) -> dict[str, list[str]]:
    """Task -> built-in recipe and overrides that train it on the fixtures (as `visiontune fixtures` prints them)."""
    detect = ["data.image_size=64", f"model=timm:local-dir:{fx / 'timm-cnn'}"]
    vlm = ["eval.max_samples=2", "eval.max_new_tokens=2", "train.precision=fp32"]
    return {
        "classify": [
            "imagefolder-convnext",
            f"model={fx / 'timm-cnn'}",
            f"data.train={fx / 'images'}",
            "train.precision=fp32",
        ],
        "detect": ["mnist-fcos-lite0", *detect, "data.train=builtin:mnist-detect:64"]
        + ["data.val=builtin:mnist-detect-heldout:16"],
        "segment": ["mnist-fpn-lite0", *detect, "data.train=builtin:mnist-segment:64"]
        + ["data.val=builtin:mnist-segment-heldout:16"],
        "vlm_sft": ["smolvlm-lora", *vlm, f"model={fx / 'vlm' / 'qwen2_vl'}", f"data.train={fx / 'conversations.json'}"]
        + ["data.dataset_name=null", "train.grad_accum=1"],
        "vlm_preference": ["qwen2-vl-dpo", *vlm, f"model={fx / 'vlm' / 'qwen2_vl'}"]
        + [f"data.train={fx / 'preferences.jsonl'}"],
        "vlm_assemble": ["mnist-align", *vlm, "data.limit=16", f"vision=timm:local-dir:{fx / 'timm-cnn'}"]
        + [f"language={fx / 'lm' / 'llama'}"],
    }


def clip_runs(fx: Path, l_lora: bool = True) -> dict[str, list[str]]:
    """CLIP mode -> built-in recipe and overrides that train it on the fixtures for a few steps (zero-shot head full /
    LoRA with WiSE-FT / L-LoRA unless `l_lora` is false / contrastive with the temperature trainable)."""
    # colour names as prompts: the folder names (class_0...) give the tiny text tower one embedding for every class
    clip, images = f"model={fx / 'clip'}", [f"data.train={fx / 'images'}", "data.prompt_names=[red,green,blue]"]
    small = ["data.image_size=32", "train.batch_size=4", "data.workers=0", "train.precision=fp32"]
    return {
        "full": ["l-lora", clip, *images, *small, "tune.method=full"],
        "lora": ["cifar-style-lora", clip, *images, *small, f"wise_ft.control={fx / 'images'}"],
        **({"l_lora": ["l-lora", clip, *images, *small]} if l_lora else {}),
        "contrastive": ["mnist-dual-encoder", clip, f"data.train={fx / 'captions.csv'}", *small]
        + ["data.zero_shot=null", "data.zero_shot_class_names=null", "train.logging_steps=1"],
    }


@pytest.fixture(scope="module")
def fixtures_all(tmp_path_factory) -> Path:
    """Every fixture `visiontune fixtures` writes (tiny models and data of all tasks); one copy per test module."""
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import write_everything

    out = tmp_path_factory.mktemp("two-ranks-fixtures")
    with fixture_seed():
        write_everything(out / "fx")
    return out / "fx"


@pytest.fixture(scope="module")
def fixtures_clip(tmp_path_factory) -> Path:
    """The tiny models (the CLIP one among them) with the image folder and captions; one copy per test module."""
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import write_all, write_data

    out = tmp_path_factory.mktemp("two-ranks-clip-fixtures") / "fx"
    with fixture_seed():
        written = write_all(out)
    write_data(out, written["images"])
    return out


def launch(engine: str, runs: list[dict], tmp: Path, timeout: int, before: str = "") -> None:
    """One launch of two ranks (visiontune.run.distributed.run_ranks) that runs the engine's worker over `runs`
    ({"argv": train arguments, "out": where the steps record goes}), in `tmp`, with its own cache. `before`: code
    each rank runs first (a test's own patches)."""
    (tmp / "runs.json").write_text(json.dumps(runs))
    (tmp / "worker.py").write_text(before + WORKERS[engine])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "VISIONTUNE_ERROR_DIR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VISIONTUNE_CACHE=str(tmp / "cache"))
    code = "import sys; from visiontune.run.distributed import run_ranks; sys.exit(run_ranks(2, sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, str(tmp / "worker.py"), str(tmp / "runs.json")]
    # a timeout, not a hang: ranks that disagree on which parameters to gather wait for each other forever
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def train_and_resume(engine: str, setting: str, runs: dict[str, list[str]], tmp: Path, timeout: int) -> Path:
    """Under `train.<engine>=<setting>`, trains each run for two steps into `tmp/NAME`, then resumes each from its
    checkpoint for a third (its steps record in `tmp/NAME-resumed`), all in one launch; returns `tmp`."""
    common = [f"train.{engine}={setting}", "train.max_steps=2", "train.logging_steps=1"]
    first = [
        {"argv": [*argv, f"output_dir={tmp / name}", *common], "out": str(tmp / name)} for name, argv in runs.items()
    ]
    resumed = []
    for name, argv in runs.items():
        (tmp / f"{name}-resumed").mkdir()
        again = [*argv, f"output_dir={tmp / name}", *common, "train.max_steps=3", "train.resume=true"]
        resumed.append({"argv": again, "out": str(tmp / f"{name}-resumed")})
    launch(engine, first + resumed, tmp, timeout)
    return tmp


def steps(out: Path, engine: str) -> list[str]:
    """The steps rank 0 recorded in `out`, after checking rank 1 took the same ones, all through the engine."""
    ranks = [json.loads((out / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] and ranks[0] == ranks[1], ranks
    if engine == "deepspeed":
        assert set(ranks[0]) == {"DeepSpeedEngine"}, f"{out.name} trained through {set(ranks[0])}, not DeepSpeed"
    else:
        assert all(s.endswith(" sharded") for s in ranks[0]), f"{out.name} trained through {set(ranks[0])}, not FSDP2"
    return ranks[0]


def same_weights(run: Path) -> None:
    """Both ranks took part (world size 2, samples seen) and ended with the same weights (ZeRO-3/FSDP: gathered)."""
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["samples_seen"] > 0 for r in ranks), ranks
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], f"{run}: the ranks ended with other weights"


def finite_losses(run: Path, at_least: int) -> None:
    """At least `at_least` losses logged in the run's metrics.jsonl, all finite."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= at_least and all(math.isfinite(v) for v in losses), rows


def engine_checkpoint(checkpoint: Path, step: int, engine: str) -> None:
    """The Trainer checkpoint in the engine's own layout (accelerate's FSDP one with the optimiser state)."""
    if engine == "deepspeed":
        assert (checkpoint / f"global_step{step}").is_dir(), f"{checkpoint}: not DeepSpeed's checkpoint layout"
    else:
        assert (checkpoint / "pytorch_model_fsdp.bin").is_file(), f"{checkpoint}: not accelerate's FSDP checkpoint"
        assert list(checkpoint.glob("optimizer*")), f"{checkpoint} holds no optimiser state"


def check_resumed(tmp: Path, name: str, engine: str) -> Path:
    """The checks of every run of `train_and_resume`: both ranks' steps through the engine, a resume that trained step
    3 only, the same weights on both ranks, finite losses for steps 1-3, and the engine's checkpoint-3. Returns the
    run folder for the caller's own checks."""
    run = tmp / name
    first, resumed = len(steps(run, engine)), len(steps(tmp / f"{name}-resumed", engine))
    assert first == 2 * resumed, (first, resumed)  # the resumed run trained step 3 only (each step: grad_accum batches)
    same_weights(run)
    finite_losses(run, 3)  # steps 1, 2 and the resumed 3
    assert json.loads((run / "summary.json").read_text())["global_step"] == 3
    engine_checkpoint(run / "checkpoints" / "checkpoint-3", 3, engine)
    return run


def export(run: Path) -> Path:
    """The run's one export folder (`model` or `adapter`)."""
    found = [run / name for name in ("model", "adapter") if (run / name).is_dir()]
    assert len(found) == 1, f"{run}: expected one export, found {found}"
    return found[0]


def whole_tensors(export: Path) -> None:
    """The export holds weights, none an empty tensor (a ZeRO-3 or FSDP2 shard saved as is would be)."""
    from safetensors import safe_open

    files = sorted(export.rglob("*.safetensors"))
    assert files, f"{export} holds no weights"
    for file in files:
        with safe_open(file, "pt") as f:
            assert all(f.get_slice(k).get_shape() != [0] for k in f.keys()), f"{file} holds an empty tensor"


def plain_scale(model_dir: Path) -> float:
    """The exported CLIP temperature, read by plain transformers: a 0-dim tensor, as CLIPModel holds it."""
    from safetensors import safe_open
    from transformers import CLIPModel

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert f.get_slice("logit_scale").get_shape() == [], "the export keeps the 1-element training shape"
    scale = CLIPModel.from_pretrained(model_dir).logit_scale
    assert scale.dim() == 0
    return float(scale)


def check_clip_export(run: Path, fx: Path, mode: str) -> None:
    """A CLIP mode's export: plain transformers loads it with a 0-dim temperature (the trained one for contrastive,
    the fixture's otherwise), LoRA's WiSE-FT read it back, L-LoRA's classifier loads with a 0-dim scale."""
    scale, fixture_scale = plain_scale(run / "model"), plain_scale(fx / "clip")
    if mode == "contrastive":  # the temperature trains there: the trained value, not the starting one, is exported
        assert scale != fixture_scale
    else:
        assert scale == fixture_scale
    if mode == "lora":
        assert (run / "wise_ft_model").is_dir()  # WiSE-FT read the export back
    if mode == "l_lora":
        from visiontune.clip.classify import load_clip_classifier

        assert load_clip_classifier(str(run / "model")).encoder.model.logit_scale.dim() == 0
