"""vlm_preference through the CLI as every task: an interrupted run resumed trains as the uninterrupted one (LoRA
starts from the recipe's seed). The shared tiny world serves test_preference_ddp.py too."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visiontune.run.folder import last_checkpoint
from visiontune.testing.fixtures import preference_pairs
from visiontune.vlm.preference import PreferenceTrainer


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from visiontune.testing.vlm_fixtures import tiny_vlm

    root = tmp_path_factory.mktemp("pref-run")
    convs = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))] * 4):
        Image.new("RGB", (32, 32), tuple(min(255, c + i) for c in rgb)).save(root / f"{i}.png")
        question = {"role": "user", "content": "<image>What colour is this image?"}
        convs.append({"messages": [question, {"role": "assistant", "content": name}], "images": [f"{i}.png"]})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in preference_pairs(convs)) + "\n")
    return {"model": tiny_vlm("qwen2_vl", root / "model"), "pairs": root / "pairs.jsonl"}


def _recipe(world, out: Path, **train) -> dict:
    return {
        "task": "vlm_preference",
        "model": str(world["model"]),
        "output_dir": str(out),
        "data": {"train": str(world["pairs"]), "val_split": 0.25, "max_length": 256},
        "train": {"batch_size": 2, "lr": 1e-3, "logging_steps": 1, **train},
        "eval": {"max_new_tokens": 2, "max_samples": 1, "samples_during_training": 0},
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


def test_resume_after_an_interruption_trains_as_the_uninterrupted_run(world, write_recipe, cli, monkeypatch, tmp_path):
    train = {"max_steps": 4, "eval_steps": 2, "save_total_limit": 5}
    assert cli("train", write_recipe(_recipe(world, tmp_path / "full", **train), "full.yaml"))[0] == 0
    recipe = write_recipe(_recipe(world, tmp_path / "cut", **train), "cut.yaml")
    original = PreferenceTrainer.training_step

    def step_then_stop(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return original(self, model, inputs, num_items_in_batch)

    with monkeypatch.context() as m:
        m.setattr(PreferenceTrainer, "training_step", step_then_stop)
        code, _, err = cli("train", recipe)
    assert code == 130 and "--resume" in err
    assert last_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    name = "checkpoints/checkpoint-4/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
    assert a and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
