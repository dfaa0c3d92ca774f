"""No evaluation runs twice on the same weights: the "after" evaluation reuses the last validation when training
ended on the weights it validated (a VLM's held-out loss was computed twice at the end of every run)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import Trainer


@pytest.fixture
def loops(monkeypatch) -> list[str]:
    """Spy on the transformers evaluation loop (what actually runs the model over the validation set)."""
    calls: list[str] = []
    original = Trainer.evaluation_loop

    def spy(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        calls.append(metric_key_prefix)
        return original(self, dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    monkeypatch.setattr(Trainer, "evaluation_loop", spy)
    return calls


def _last_validation(run: Path) -> dict:
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logs if any(k.startswith("eval_") for k in r)][-1]
    return {k.removeprefix("eval_"): v for k, v in last.items() if k.startswith("eval_")}


def test_after_reuses_the_last_validation_of_the_same_weights(tiny_recipe, write_recipe, cli, loops):
    recipe = tiny_recipe(train={"epochs": 1})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    assert loops == ["before", "eval"]  # no third pass over the validation set for "after"
    run = Path(recipe["output_dir"])
    after = json.loads((run / "eval" / "after.json").read_text())
    validation = _last_validation(run)
    assert after["metrics"]["accuracy"] == validation["accuracy"]
    assert after["metrics"]["loss"] == pytest.approx(validation["loss"], rel=1e-6)
    assert after["confusion_matrix"] and len(after["per_class"]) == 3  # the task's full report, not only scalars


def _trainer(recipe: Path, run_dir: Path):
    """The runner's Trainer for a recipe, built without training; with the recipe and the task's Fit."""
    from visiontune.recipe import get_task, load_recipe
    from visiontune.run.runner import make_trainer

    cfg = load_recipe(recipe, [])
    task = get_task(cfg.task)
    fit = task.build(cfg, task.prepare(cfg), run_dir)
    return cfg, fit, make_trainer(cfg, fit, run_dir)


def test_other_weights_or_data_are_evaluated_again(tiny_recipe, write_recipe, tmp_path, loops):
    _, fit, trainer = _trainer(write_recipe(tiny_recipe()), tmp_path / "run")
    first = trainer.evaluate(metric_key_prefix="a")
    again = trainer.evaluate(metric_key_prefix="b")
    assert loops == ["a"] and again["b_loss"] == first["a_loss"]
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).add_(0.5)
    trainer.evaluate(metric_key_prefix="c")
    trainer.evaluate(eval_dataset=torch.utils.data.Subset(fit.eval_dataset, range(4)), metric_key_prefix="d")
    assert loops == ["a", "c", "d"]


@pytest.mark.random_model
def test_a_vlm_run_computes_its_held_out_loss_once_at_the_end(tmp_path, write_recipe, cli, loops):
    from PIL import Image

    from visiontune.testing.vlm_fixtures import tiny_vlm

    model = tiny_vlm("qwen2_vl", tmp_path / "qwen2_vl")
    records = []
    for i in range(8):
        Image.new("RGB", (32, 32), (200 * (i % 2), 60, 90)).save(tmp_path / f"{i}.png")
        question = {"role": "user", "content": "<image>Which colour?"}
        records.append({"messages": [question, {"role": "assistant", "content": "red"}], "images": [f"{i}.png"]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = {
        "task": "vlm_sft",
        "model": str(model),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "data.json"), "val_split": 0.25},
        "eval": {"max_new_tokens": 2},
        "train": {"epochs": 1, "batch_size": 2},
    }
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    assert loops == ["before", "eval"]
    run = Path(recipe["output_dir"])
    after = json.loads((run / "eval" / "after.json").read_text())
    assert after["metrics"]["loss"] == pytest.approx(_last_validation(run)["loss"], rel=1e-6)
    assert after["samples"]  # the generation metrics still run on every validation record


def test_two_ranks_agree_on_reusing_and_on_the_auto_batch(tiny_recipe, write_recipe):
    """Under DDP the ranks decide together: a rank skipping the after evaluation that another runs would leave that
    one waiting on its gather (the ranks' weights need not hash alike mid-run); batch_size: auto takes the smallest
    batch any rank found."""
    import yaml

    from tests.conftest import train_two_ranks

    recipe = tiny_recipe(train={"batch_size": "auto", "global_batch_size": 8, "max_steps": 2})
    ranks = train_two_ranks(write_recipe(recipe))
    assert [r["rank"] for r in ranks] == [0, 1]
    train = yaml.safe_load((Path(recipe["output_dir"]) / "config.yaml").read_text())["train"]
    assert (train["batch_size"], train["grad_accum"]) == (4, 1)  # 8 over two ranks


def test_the_best_validation_is_reused_when_its_weights_come_back(tiny_recipe, write_recipe, tmp_path, loops):
    """load_best_model_at_end reloads an earlier epoch's weights: the "after" evaluation is that epoch's validation."""
    cfg, _, trainer = _trainer(write_recipe(tiny_recipe()), tmp_path / "run")
    best = trainer.evaluate(metric_key_prefix="eval")
    best_logits = trainer.compute_metrics.last_logits
    assert trainer._determine_best_metric({f"eval_{cfg.train.metric}": 1e9, "eval_loss": -1e9}, None)
    weight = next(p for p in trainer.model.parameters() if p.requires_grad)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.5)
    trainer.evaluate(metric_key_prefix="eval")  # a later epoch, not the best
    with torch.no_grad():
        weight.copy_(saved)  # the best checkpoint loaded back
    after = trainer.evaluate(metric_key_prefix="after")
    assert loops == ["eval", "eval"] and after["after_loss"] == best["eval_loss"]
    assert trainer.compute_metrics.last_logits is best_logits  # the full report "after" writes is the best's too
