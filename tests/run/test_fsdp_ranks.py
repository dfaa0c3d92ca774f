"""FSDP2 (`train.fsdp`: full_shard, shard_grad_op) for real, on two CPU ranks (gloo). accelerate sets FSDP up only on
GPUs; run/arguments.py `fsdp_on_cpu` makes its state on CPU ranks (else transformers trains plain DDP there). Per
sharding, one launch trains each task's built-in recipe on the tiny fixtures for two steps, then resumes each run from
its checkpoint for a third. Checked: every training step went through an FSDP2 (`fully_shard`) model whose parameters
are DTensor shards after the step, finite losses, the same weights on both ranks (gathered), one export of whole
tensors that its library loads, accelerate's FSDP checkpoint (optimiser included), and a resume that trains step 3
only (segment's gradual unfreeze: a frozen parameter without optimiser state). vlm_preference:
tests/vlm/test_preference_fsdp.py; the CLIP tasks: tests/clip/test_fsdp_ranks.py. Slow (twenty runs on two ranks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in each rank: `visiontune train NAME OVERRIDES...` for each run in turn (one launch: starting ranks is much of
# the time), recording for every training step whether the model was an FSDP2 module with sharded parameters.
WORKER = """
import gc, json, os, sys
from transformers import Trainer
from visiontune.cli import main

runs = json.loads(open(sys.argv[1]).read())
seen = []
training_step = Trainer.training_step

def spy(self, model, inputs, num_items_in_batch=None):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    loss = training_step(self, model, inputs, num_items_in_batch)
    # after the backward FSDP2 holds every parameter as a shard (a DTensor); DDP would hold whole tensors
    sharded = isinstance(model, FSDPModule) and all(isinstance(p, DTensor) for p in model.parameters())
    seen.append(type(model).__name__ + (" sharded" if sharded else ""))
    return loss

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
    # one run per process is what the CLI does; here the next run must not find this one's FSDP accelerator state
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    gc.collect()
"""

TASKS = ("classify", "detect", "segment", "vlm_sft", "vlm_assemble")  # vlm_preference: tests/vlm/


def _runs(fx: Path) -> dict[str, list[str]]:
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


@pytest.fixture(scope="module")
def fixtures_all(tmp_path_factory) -> Path:
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import write_everything

    out = tmp_path_factory.mktemp("fsdp-fixtures")
    with fixture_seed():
        write_everything(out / "fx")
    return out / "fx"


def _train(sharding: str, fx: Path, tmp: Path, tasks: tuple[str, ...] = TASKS) -> Path:
    common = [f"train.fsdp={sharding}", "train.max_steps=2", "train.logging_steps=1"]
    chosen = {task: argv for task, argv in _runs(fx).items() if task in tasks}
    runs = []
    for task, argv in chosen.items():
        out = tmp / task
        runs.append({"argv": [*argv, f"output_dir={out}", *common], "out": str(out)})
    for task, argv in chosen.items():  # the same runs, resumed from step 2 to step 3
        out = tmp / task
        (tmp / f"{task}-resumed").mkdir()
        resumed = [*argv, f"output_dir={out}", *common, "train.max_steps=3", "train.resume=true"]
        runs.append({"argv": resumed, "out": str(tmp / f"{task}-resumed")})
    (tmp / "runs.json").write_text(json.dumps(runs))
    (tmp / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "VISIONTUNE_ERROR_DIR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VISIONTUNE_CACHE=str(tmp / "cache"))
    code = "import sys; from visiontune.run.distributed import run_ranks; sys.exit(run_ranks(2, sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, str(tmp / "worker.py"), str(tmp / "runs.json")]
    # a timeout, not a hang: ranks that disagree on which parameters to gather wait for each other forever
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


@pytest.fixture(scope="module", params=["full_shard", "shard_grad_op"])
def trained(request, fixtures_all, tmp_path_factory) -> tuple[Path, Path]:
    return fixtures_all, _train(request.param, fixtures_all, tmp_path_factory.mktemp(request.param))


def _load_plain(task: str, export: Path, fx: Path) -> None:
    """Load the export as its library does (a saved shard in place of a whole tensor fails on its shape). detect and
    segment (torchvision nets) and vlm_assemble are rebuilt from their manifests, as `visiontune eval` does."""
    import timm
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if task == "classify":
        timm.create_model(f"local-dir:{export}")
    elif task == "detect":
        from visiontune.detect.model import build_detector

        build_detector(str(export), None)
    elif task == "segment":
        from visiontune.segment.model import build_segmenter

        build_segmenter(str(export), None)
    elif task in ("vlm_sft", "vlm_preference"):
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(fx / "vlm" / "qwen2_vl"), export)
    else:  # transformers for the language model; the rest rebuilt from the manifest (the assembled format)
        from visiontune.vlm.assembled import load_assembled

        AutoModelForCausalLM.from_pretrained(export / "language")
        load_assembled(export)


def _export(run: Path) -> Path:
    found = [run / name for name in ("model", "adapter") if (run / name).is_dir()]
    assert len(found) == 1, f"{run}: expected one export, found {found}"
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_task_trains_and_resumes_under_fsdp2(trained, task):
    from safetensors import safe_open

    fx, trained = trained
    run = trained / task
    for out in (run, trained / f"{task}-resumed"):
        steps = [json.loads((out / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
        assert steps[0] and steps[0] == steps[1], steps
        assert all(s.endswith(" sharded") for s in steps[0]), f"{task} trained through {set(steps[0])}, not FSDP2"
    first, resumed = (
        len(json.loads((out / "steps-rank0.json").read_text())) for out in (run, trained / f"{task}-resumed")
    )
    assert first == 2 * resumed, (first, resumed)  # the resumed run trained step 3 only (each step: grad_accum batches)
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["samples_seen"] > 0 for r in ranks), ranks
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], f"{task}: the ranks ended with other weights"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses), rows  # steps 1, 2 and the resumed 3
    assert json.loads((run / "summary.json").read_text())["global_step"] == 3
    checkpoint = run / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file(), f"{checkpoint}: not accelerate's FSDP checkpoint"
    assert list(checkpoint.glob("optimizer*")), f"{checkpoint} holds no optimiser state"
    export = _export(run)
    files = sorted(export.rglob("*.safetensors"))
    assert files, f"{export} holds no weights"
    for file in files:  # plain tensors (an FSDP2 state_dict holds DTensor shards)
        with safe_open(file, "pt") as f:
            assert all(f.get_slice(k).get_shape() != [0] for k in f.keys()), f"{file} holds an empty tensor"
    _load_plain(task, export, fx)
