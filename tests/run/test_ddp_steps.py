"""Two gloo ranks train in step at every optimiser step, not only at the end. A run's end-of-run checksum cannot show
this: loading the best checkpoint (saved by rank 0) makes the ranks equal again. Each rank records, after every step,
a digest of its trainable weights and the kind of model its training step went through; the ranks must agree at each
step and train through DDP. (Before `forget_evaluation_prepare` the "before" evaluation left the model marked
prepared, train() skipped the DDP wrap and the classify and vlm_sft ranks' weights differed from step 1; detect and
segment evaluate through their own loop and were spared.) Buffers are left out: DDP broadcasts rank 0's BatchNorm
statistics at the start of each forward, so after a step each rank holds the statistics of its own batch, by design."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.detect.conftest import detect_recipe
from tests.segment.test_task_e2e import _recipe as segment_recipe

# Runs in each rank: `visiontune train RECIPE` for each recipe in turn (one launch: starting ranks is most of the
# time), with a callback recording every step and a spy on the model Trainer.training_step receives (DDP when
# gradients are all-reduced).
WORKER = """
import hashlib, json, os, sys
from transformers import Trainer, TrainerCallback
import visiontune.run.runner as runner
from visiontune.cli import main

records, rank = os.environ["STEP_RECORDS"], os.environ["RANK"]
trained_through, log = [], []

def digest(model):
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode() + p.detach().double().cpu().numpy().tobytes())
    return h.hexdigest()

class StepRecord(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        row = {"step": state.global_step, "digest": digest(model), "model": trained_through[-1]}
        with open(log[-1], "a") as f:
            f.write(json.dumps(row) + "\\n")

standard = runner.standard_callbacks
runner.standard_callbacks = lambda *a, **k: [*standard(*a, **k), StepRecord()]
training_step = Trainer.training_step  # every task's trainer ends in it

def spy(self, model, inputs, num_items_in_batch=None):
    trained_through.append(type(model).__name__)
    return training_step(self, model, inputs, num_items_in_batch)

Trainer.training_step = spy
for name, recipe in zip(sys.argv[1::2], sys.argv[2::2]):
    log.append(os.path.join(records, name + "-rank" + rank + ".jsonl"))
    trained_through.clear()
    sys.argv = ["visiontune", "train", recipe]
    try:
        main()
    except SystemExit as done:  # the CLI exits after each run
        if done.code:
            raise
"""

STEPS = {"classify": 8, "detect": 2, "segment": 2, "vlm_sft": 2}


@pytest.fixture(scope="module")
def steps(fixtures_dir, tmp_path_factory) -> dict[str, list[list[dict]]]:
    """Train the three recipes on two ranks launched as `visiontune train --nproc 2` launches them; per task, each
    rank's step rows."""
    import yaml

    from visiontune.testing.detect_fixtures import write_detection_sets
    from visiontune.testing.segment_fixtures import write_segmentation_sets
    from visiontune.testing.vlm_fixtures import tiny_vlm

    tmp = tmp_path_factory.mktemp("ddp-steps")
    boxes, masks = write_detection_sets(tmp / "boxes"), write_segmentation_sets(tmp / "masks")
    classify = {
        "task": "classify",
        "model": str(fixtures_dir / "timm-vit"),
        "output_dir": str(tmp / "classify"),
        "data": {"train": str(fixtures_dir / "images"), "val_split": 0.25, "augment": {"preset": "none"}, "workers": 0},
        # 27 images, 20 to train on: 4 steps an epoch on each rank; validations between the steps
        "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0, "eval_steps": 2},
    }
    recipes = {
        "classify": classify,
        "detect": detect_recipe(fixtures_dir, boxes, tmp / "detect", train={"epochs": 1, "max_steps": 2}),
        "segment": segment_recipe(fixtures_dir, masks, tmp / "segment", train={"max_steps": 2, "eval_steps": 1}),
        "vlm_sft": {  # LoRA adapters on a tiny Qwen2-VL
            "task": "vlm_sft",
            "model": str(tiny_vlm("qwen2_vl", tmp / "vlm")),
            "output_dir": str(tmp / "vlm_sft"),
            "data": {"train": str(_colour_conversations(tmp / "colours")), "val_split": 0.25, "max_length": 256},
            "eval": {"max_new_tokens": 2, "max_samples": 1},
            "train": {"max_steps": 2, "batch_size": 1, "logging_steps": 1},
        },
    }
    args = []
    for name, recipe in recipes.items():
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        args += [name, str(tmp / f"{name}.yaml")]
    worker, records = tmp / "worker.py", tmp / "steps"
    worker.write_text(WORKER)
    records.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "VISIONTUNE_ERROR_DIR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", STEP_RECORDS=str(records), VISIONTUNE_CACHE=str(tmp / "cache"))
    code = "import sys; from visiontune.run.distributed import run_ranks; sys.exit(run_ranks(2, sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(worker), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        name: [
            [json.loads(line) for line in (records / f"{name}-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
        ]
        for name in recipes
    }


def _colour_conversations(root: Path) -> Path:
    from PIL import Image

    root.mkdir()
    records = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 30))] * 4):
        Image.new("RGB", (40, 30), rgb).save(root / f"{i}.png")
        turns = [{"role": "user", "content": "<image>What colour is this?"}, {"role": "assistant", "content": name}]
        records.append({"messages": turns, "images": [f"{i}.png"]})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


@pytest.mark.parametrize("task", list(STEPS))
def test_ranks_agree_after_every_step(steps, task):
    rank0, rank1 = steps[task]
    count = STEPS[task]
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == list(range(1, count + 1))
    assert all(r["model"] == "DistributedDataParallel" for r in rank0 + rank1), "a rank trained without DDP"
    assert len({r["digest"] for r in rank0}) == count  # the weights moved at every step: the digests are a record
    for a, b in zip(rank0, rank1, strict=True):
        assert a["digest"] == b["digest"], f"{task}: the ranks' weights differ after step {a['step']}"
