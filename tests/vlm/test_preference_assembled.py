"""vlm_preference on an assembled VLM (`init_from` a vlm_assemble run; tiny CLIP + Qwen2 parts as in
test_assembled.py): two steps move the adapters and the projector while the reference (PEFT adapters off: LoRA off and
the original projector) stays the frozen start; the loss equals TRL's DPO loss on log-probs from a plain per-answer
forward; ORPO runs no reference forward; the merged export; pairs mined from the assembled model (resume:
test_preference_assembled_resume.py; two ranks: test_preference_assembled_ddp.py; the plan: test_preference_plan.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.vlm.test_preference_loss import trl_dpo_loss
from visiontune.core.errors import RecipeError
from visiontune.recipe import parse_config
from visiontune.registry import TASKS


@pytest.fixture
def world(assembled_preference_world) -> dict[str, Path]:
    return assembled_preference_world  # tests/vlm/conftest.py: built once for every module that tunes it


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _raw(world, out: Path, **sections) -> dict:
    raw = {
        "task": "vlm_preference",
        "init_from": str(world["run"]),
        "output_dir": str(out),
        "data": {"train": str(world["pairs"]), "val_split": 0.25, "max_length": 128},
        "train": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "lr": 3e-3, "warmup_ratio": 0.0},
        "eval": {"max_new_tokens": 2, "max_samples": 1, "samples_during_training": 0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def _built(cfg):
    from visiontune.run.runner import make_trainer

    task = TASKS["vlm_preference"].create()
    prepared = task.prepare(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    fit = task.build(cfg, prepared, Path(cfg.output_dir))
    return prepared, fit, make_trainer(cfg, fit, Path(cfg.output_dir))


def _plain_logps(model, processor, items, max_pixels: int):
    """What TRL's DPOTrainer computes: every row ([chosen; rejected]) with its own copy of the image, full logits,
    the answers' per-token log-probs."""
    from visiontune.vlm.collate import VlmCollator
    from visiontune.vlm.preference_loss import sequence_logps

    rows = [i["chosen"] for i in items] + [i["rejected"] for i in items]
    batch = VlmCollator(processor, max_pixels)(rows)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    return sequence_logps(logits, labels), labels


def test_two_steps_move_adapters_and_projector_and_the_reference_stays_the_frozen_start(world, tmp_path):
    from visiontune.vlm.assembled import load_assembled

    cfg = parse_config(_raw(world, tmp_path / "run"))
    prepared, fit, trainer = _built(cfg)
    assert trainer.mode == "adapters_off"
    batch = fit.collator([fit.train_dataset[0], fit.train_dataset[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 2  # images once per pair
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in start) and any(".projector." in n for n in start)
    items = [fit.train_dataset[i] for i in range(2)]
    frozen, _ = load_assembled(world["run"] / "model")
    expected, labels = _plain_logps(frozen.eval(), prepared.processor, items, cfg.data.max_image_pixels)
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in start and not torch.equal(p, start[n])]
    assert any("lora_B" in n for n in moved) and any(".projector." in n for n in moved)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert len(train) == 2 and train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert all(math.isfinite(r["loss"]) and "rewards/margins" in r for r in train)
    trainer.model.eval()
    batch = fit.collator(items)
    labels = batch.pop("labels")
    reference = trainer.reference_logps(trainer.model, batch, labels)
    torch.testing.assert_close(reference, expected.logps, rtol=1e-5, atol=1e-4)  # adapters off = the start
    policy, _ = _plain_logps(trainer.model, prepared.processor, items, cfg.data.max_image_pixels)
    assert (policy.logps - expected.logps).abs().max() > 1e-3  # the trained model is not its own reference


@pytest.mark.parametrize(
    ("kind", "beta", "rpo_alpha"), [("sigmoid", 0.1, None), ("ipo", 0.3, None), ("sigmoid", 0.2, 0.5)]
)
def test_loss_equals_trl_dpo_loss_on_log_probs_of_a_plain_forward(world, tmp_path, kind, beta, rpo_alpha):
    """TRL cannot take the assembled model: our trainer's loss (images encoded once per pair, answer logits only,
    reference with adapters off) equals TRL's DPOTrainer._compute_loss on log-probs from a plain forward of every
    answer with its own image, by the trained policy and by a freshly loaded frozen start."""
    from visiontune.vlm.assembled import load_assembled

    loss_cfg = {"type": kind, "beta": beta} | ({"rpo_alpha": rpo_alpha} if rpo_alpha else {})
    cfg = parse_config(_raw(world, tmp_path / "run", loss=loss_cfg))
    prepared, fit, trainer = _built(cfg)
    trainer.train()  # so that policy and reference differ
    trainer.model.eval()
    items = [fit.train_dataset[i] for i in range(3)]
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, fit.collator(items))
    frozen, _ = load_assembled(world["run"] / "model")
    policy, labels = _plain_logps(trainer.model, prepared.processor, items, cfg.data.max_image_pixels)
    reference, _ = _plain_logps(frozen.eval(), prepared.processor, items, cfg.data.max_image_pixels)
    types, weights = ([kind, "sft"], [1.0, rpo_alpha]) if rpo_alpha else ([kind], [1.0])
    theirs, _ = trl_dpo_loss(types, weights, beta, 0.0, (policy.per_token, labels != -100, reference.logps))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_orpo_trains_without_any_reference_forward(world, tmp_path, monkeypatch):
    from peft import PeftModel

    import visiontune.vlm.preference_reference as reference

    entered = []
    monkeypatch.setattr(PeftModel, "disable_adapter", lambda self: entered.append(self))
    monkeypatch.setattr(reference, "compute_reference", lambda *a, **k: entered.append(a))
    cfg = parse_config(_raw(world, tmp_path / "run", loss={"type": "orpo", "beta": 0.2}))
    prepared, fit, trainer = _built(cfg)
    assert trainer.mode == "none" and fit.train_dataset.reference is None
    trainer.train()
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) and "log_odds_ratio" in r for r in train)
    assert entered == []
    full = parse_config(_raw(world, tmp_path / "full", loss={"type": "orpo"}, tune={"method": "full"}))
    _, fit, trainer = _built(full)
    assert trainer.mode == "none" and entered == []


def test_pairs_from_an_assembled_models_beams(world, tmp_path):
    from visiontune.vlm.preference_pairs import mine_pairs

    found = mine_pairs(str(world["run"]), str(world["questions"]), tmp_path / "p.jsonl", samples=3, beams=True)
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert found["questions"] == 3 and found["pairs"] == len(lines) > 0  # an untrained model answers wrongly
    assert all(r["chosen"][0]["content"][0]["text"] in ("red", "green", "blue") for r in lines)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"model": "m"}, "set exactly one of `model`"),
        ({"init_from": None}, "set exactly one of `model`"),
        ({"tune": {"method": "qlora"}}, "an assembled VLM \\(init_from\\) takes lora or full"),
        ({"tune": {"dtype": "bf16"}}, "tune.dtype acts only with `model`"),
    ],
)
def test_init_from_recipes_that_cannot_work_are_refused(world, tmp_path, extra, match):
    raw = _raw(world, tmp_path / "run")
    raw.update(extra)
    with pytest.raises(RecipeError, match=match):
        parse_config(raw)


def test_init_from_a_folder_that_is_not_an_assembled_run_is_named(world, tmp_path):
    cfg = parse_config(_raw(world, tmp_path / "run") | {"init_from": str(tmp_path)})
    with pytest.raises(RecipeError, match="is not a vlm_assemble run"):
        TASKS["vlm_preference"].create().prepare(cfg)


def test_full_tuning_reference_is_computed_once_and_fixed_and_the_model_is_exported(world, tmp_path):
    from visiontune.vlm.assembled import load_assembled

    cfg = parse_config(_raw(world, tmp_path / "run", tune={"method": "full", "train_language": False}))
    prepared, fit, trainer = _built(cfg)
    assert trainer.mode == "precomputed"
    start = fit.train_dataset.reference.clone()
    frozen, _ = load_assembled(world["run"] / "model")
    items = [fit.train_dataset[i] for i in range(len(fit.train_dataset))]
    expected, _ = _plain_logps(frozen.eval(), prepared.processor, items, cfg.data.max_image_pixels)
    torch.testing.assert_close(start, torch.stack(expected.logps.chunk(2), dim=1), rtol=1e-5, atol=1e-4)
    projector = frozen.projector.net[0].weight.clone()
    trainer.train()
    assert torch.equal(fit.train_dataset.reference, start)
    assert not torch.equal(trainer.model.projector.net[0].weight, projector)
    assert all(not p.requires_grad for p in trainer.model.language.parameters())
    extras = TASKS["vlm_preference"].create().save(cfg, fit, trainer, prepared, tmp_path / "run", {})
    assert extras["trainable_parameters"]["language"] == 0
    saved, _ = load_assembled(tmp_path / "run" / "model")
    assert torch.equal(saved.projector.net[0].weight, trainer.model.projector.net[0].weight)
