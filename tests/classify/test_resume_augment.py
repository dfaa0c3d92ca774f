"""Issue 15: a run resumed with random augmentation and loader workers is the uninterrupted run (the same weights),
and its metrics.jsonl holds each step once (the killed run's rows past its checkpoint are dropped)."""

from __future__ import annotations

import json
from collections import Counter

import torch
from safetensors.torch import load_file

from visiontune.run.trainer import VisiontuneTrainer

KILL_AT = 4  # after checkpoint-3 was saved: steps 4.. are logged by the killed run and then again by the resumed one


def _interrupt_at(monkeypatch, step: int) -> None:
    original = VisiontuneTrainer.training_step

    def step_then_stop(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(VisiontuneTrainer, "training_step", step_then_stop)


def test_resume_with_strong_augmentation_and_workers_is_the_uninterrupted_run(
    tiny_recipe, write_recipe, cli, monkeypatch, tmp_path
):
    sections = {
        "data": {"augment": {"preset": "strong"}, "workers": 2},
        "train": {"max_steps": 8, "eval_steps": 3, "save_total_limit": 5, "lr": 1e-3, "metric": "loss"},
    }
    full = tiny_recipe(**sections, output_dir=str(tmp_path / "full"))
    assert cli("train", write_recipe(full, "full.yaml"))[0] == 0
    cut = tiny_recipe(**sections, output_dir=str(tmp_path / "cut"))
    recipe = write_recipe(cut, "cut.yaml")
    with monkeypatch.context() as m:
        _interrupt_at(m, KILL_AT)
        assert cli("train", recipe)[0] == 130
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err

    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    train_steps = Counter(row["step"] for row in rows if "loss" in row)
    assert max(train_steps.values()) == 1 and sorted(train_steps) == list(range(1, 9))
    full_loss = {
        r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").open()) if "loss" in r
    }
    cut_loss = {row["step"]: row["loss"] for row in rows if "loss" in row}
    assert cut_loss == full_loss
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_contrastive_resume_with_augmentation_and_workers_is_the_uninterrupted_run(
    fixtures_dir, write_recipe, cli, monkeypatch, tmp_path
):
    """Captions are drawn per epoch and images augmented in the workers: both per (seed, epoch, image)."""
    images = sorted((fixtures_dir / "images").rglob("*.png"))
    captions = tmp_path / "captions.csv"
    rows = [f"{p},a {c} picture\n{p},a photo of the {c} image" for p in images for c in [p.parent.name[-1]]]
    captions.write_text("image,caption\n" + "\n".join(rows) + "\n")

    def recipe(name: str) -> dict:
        return {
            "task": "clip_contrastive",
            "model": str(fixtures_dir / "clip"),
            "output_dir": str(tmp_path / name),
            "trainable": "both",
            "data": {"train": str(captions), "val_split": 0.25, "workers": 2, "augment": {"preset": "strong"}},
            "train": {"max_steps": 8, "eval_steps": 3, "batch_size": 6, "lr": 1e-3, "logging_steps": 1},
        }

    assert cli("train", write_recipe(recipe("full"), "full.yaml"))[0] == 0
    cut = write_recipe(recipe("cut"), "cut.yaml")
    with monkeypatch.context() as m:
        _interrupt_at(m, KILL_AT)
        assert cli("train", cut)[0] == 130
    code, _, err = cli("train", cut, "--resume")
    assert code == 0, err
    losses = [
        {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").open()) if "loss" in r}
        for name in ("full", "cut")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 8
