"""Resume after an interruption reproduces an uninterrupted run; a kill mid-save keeps a loadable checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visiontune.run.folder import last_checkpoint
from visiontune.run.trainer import VisiontuneTrainer


def _interrupt_at(monkeypatch, step: int):
    original = VisiontuneTrainer.training_step

    def step_then_stop(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(VisiontuneTrainer, "training_step", step_then_stop)


def test_resume_matches_uninterrupted_run(tiny_recipe, write_recipe, cli, monkeypatch, tmp_path):
    # Best by loss: the tiny model's accuracy reaches 1.0 by step 3 and, tied from there on, would keep checkpoint-3,
    # saved before the cut, as the final model of both runs.
    sections = {"train": {"max_steps": 8, "eval_steps": 3, "save_total_limit": 5, "lr": 1e-3, "metric": "loss"}}
    full = tiny_recipe(**sections, output_dir=str(tmp_path / "full"))
    assert cli("train", write_recipe(full, "full.yaml"))[0] == 0

    cut = tiny_recipe(**sections, output_dir=str(tmp_path / "cut"))
    recipe = write_recipe(cut, "cut.yaml")
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        code, _, err = cli("train", recipe)
    assert code == 130 and "--resume" in err
    assert last_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    assert not (tmp_path / "cut" / "model").exists()

    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    state = json.loads((last_checkpoint(tmp_path / "cut") / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    best = json.loads((tmp_path / "cut" / "summary.json").read_text())["best_checkpoint"]
    assert not best.endswith("checkpoint-3")  # the final model was trained after the cut
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    full_ckpt = load_file(str(tmp_path / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    cut_ckpt = load_file(str(tmp_path / "cut" / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    for key in full_ckpt:
        torch.testing.assert_close(full_ckpt[key], cut_ckpt[key], rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_says_what_to_do(tiny_recipe, write_recipe, cli):
    code, _, err = cli("train", write_recipe(tiny_recipe()), "--resume")
    assert code == 2 and "no complete checkpoint" in err


def test_kill_during_save_keeps_previous_checkpoint(tiny_recipe, write_recipe, cli, monkeypatch, tmp_path):
    calls = {"n": 0}
    original = VisiontuneTrainer._save_rng_state

    def dies_on_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is killed half-way through writing checkpoint-4
        return original(self, output_dir)

    monkeypatch.setattr(VisiontuneTrainer, "_save_rng_state", dies_on_second_save)
    recipe = tiny_recipe(train={"max_steps": 6, "eval_steps": 2, "save_total_limit": 2})
    assert cli("train", write_recipe(recipe))[0] == 130
    run = Path(recipe["output_dir"])
    assert last_checkpoint(run).name == "checkpoint-2"
    assert (run / "checkpoints" / ".partial" / "checkpoint-4").is_dir()  # the torn write is quarantined
    assert not (run / "checkpoints" / "checkpoint-4").exists()
    monkeypatch.undo()
    code, _, err = cli("train", write_recipe(recipe), "--resume")
    assert code == 0, err
    assert last_checkpoint(run).name == "checkpoint-6"


@pytest.mark.parametrize("flag", ["resume: true"])
def test_resume_key_in_recipe(flag, tiny_recipe, write_recipe, cli):
    recipe = tiny_recipe(train={"max_steps": 2, "eval_steps": 1})
    assert cli("train", write_recipe(recipe))[0] == 0
    recipe["train"]["resume"] = True
    recipe["train"]["max_steps"] = 3
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    assert last_checkpoint(Path(recipe["output_dir"])).name == "checkpoint-3"
