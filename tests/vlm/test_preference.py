"""vlm_preference on the tiny fixture of every family: two training steps whose loss is finite and whose adapters
move, TRL's reward metrics in training and validation logs, the reference (LoRA: the same model with its adapters
off, equal to a separate frozen copy; full tuning: computed once before training, cached, never moving), and the
pair checks that need the tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from visiontune.core.errors import DataError, RecipeError
from visiontune.recipe import parse_config
from visiontune.registry import TASKS
from visiontune.testing.fixtures import preference_pairs

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "idefics3", "llava")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    from visiontune.testing.vlm_fixtures import write_all_vlms

    return write_all_vlms(tmp_path_factory.mktemp("vlms"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    convs = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 3):
        Image.new("RGB", (32, 32), tuple(min(255, c + i) for c in rgb)).save(root / f"{i}.png")
        question = {"role": "user", "content": "<image>What colour is this image?"}
        convs.append({"messages": [question, {"role": "assistant", "content": name}], "images": [f"{i}.png"]})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in preference_pairs(convs)) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(model: Path, data: Path, out: Path, **overrides):
    raw = {
        "task": "vlm_preference",
        "model": str(model),
        "output_dir": str(out),
        "data": {"train": str(data), "val_split": 0.25, "max_length": 256},
        "train": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "lr": 1e-3},
        "eval": {"max_new_tokens": 2, "max_samples": 1, "samples_during_training": 0},
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(raw)


def _built(cfg):
    from visiontune.run.runner import make_trainer

    task = TASKS["vlm_preference"].create()
    prepared = task.prepare(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    fit = task.build(cfg, prepared, Path(cfg.output_dir))
    return task, prepared, fit, make_trainer(cfg, fit, Path(cfg.output_dir))


def _logs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")


@pytest.mark.parametrize("family", FAMILIES)
def test_two_lora_steps_on_every_family(family, vlms, pairs, tmp_path):
    cfg = _cfg(vlms[family], pairs, tmp_path / "run", **{"train.eval_steps": 2})
    _, _, fit, trainer = _built(cfg)
    batch = fit.collator([fit.train_dataset[0], fit.train_dataset[1]])
    assert batch["input_ids"].shape[0] == 4 and "pixel_values" in batch  # [chosen; rejected], images once
    if family.startswith("qwen"):
        assert batch["image_grid_thw"].shape[0] == 2 and "mm_token_type_ids" in batch
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(float(p.abs().sum()) == 0 for p in lora_b.values())  # PEFT starts B at zero
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in lora_b and not torch.equal(p, lora_b[n])]
    assert moved, "no adapter weight changed"
    logs = _logs(tmp_path / "run")
    train = [r for r in logs if "loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert all(k in train[0] for k in REWARDS)
    evaluated = next(r for r in logs if "eval_loss" in r)
    assert all(f"eval_{k}" in evaluated for k in REWARDS)


VISION = {"qwen2_vl": "visual", "qwen2_5_vl": "visual", "idefics3": "vision_model", "llava": "vision_tower"}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_image_is_encoded_once_per_pair_with_the_logits_of_a_forward_over_both_answers(family, vlms, pairs):
    """The pair forward (images of the chosen rows, features given twice) equals the plain forward TRL runs (every
    row with its own copy of the images), while the vision tower sees each image once."""
    from transformers import AutoModelForImageTextToText

    from visiontune.vlm.collate import VlmCollator
    from visiontune.vlm.preference_forward import answer_logps, pair_logits
    from visiontune.vlm.preference_loss import sequence_logps

    cfg = _cfg(vlms[family], pairs, Path("unused"))
    task = TASKS["vlm_preference"].create()
    prepared = task.prepare(cfg)
    fit = task.build(cfg, prepared, Path("unused"))
    items = [fit.train_dataset[i] for i in range(2)]
    rows = [i["chosen"] for i in items] + [i["rejected"] for i in items]
    plain = VlmCollator(prepared.processor, cfg.data.max_image_pixels)(rows)
    paired = fit.collator(items)
    model = AutoModelForImageTextToText.from_pretrained(vlms[family]).eval()
    tower = getattr(model.model, VISION[family])
    seen = []
    tower.register_forward_hook(lambda module, args, out: seen.append(1))
    with torch.no_grad():
        expected = model(**{k: v for k, v in plain.items() if k != "labels"}, use_cache=False).logits
        calls_plain = len(seen)
        got = pair_logits(model, {k: v for k, v in paired.items() if k != "labels"})
    assert len(seen) - calls_plain == calls_plain  # one tower call either way, on half the images here
    for key in ("pixel_values", "image_grid_thw"):
        if key in plain:
            assert paired[key].shape[0] * 2 == plain[key].shape[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # only the answers' logits (logits_to_keep), the same log-probs
        kept = answer_logps(model, {k: v for k, v in paired.items() if k != "labels"}, paired["labels"])
    torch.testing.assert_close(kept.logps, sequence_logps(expected, plain["labels"]).logps, rtol=1e-4, atol=1e-4)


def test_gradient_accumulation_averages_the_pair_loss(vlms, pairs, tmp_path):
    cfg = _cfg(vlms["qwen2_vl"], pairs, tmp_path / "run", **{"train.grad_accum": 2, "train.max_steps": 1})
    _, _, _, trainer = _built(cfg)
    trainer.train()
    (first,) = [r for r in _logs(tmp_path / "run") if "loss" in r]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # not 2 x log 2: each micro-batch is log 2


@pytest.mark.random_model  # the trained adapters move the log-probs by more than rounding
def test_reference_is_the_model_with_adapters_off_and_equals_a_frozen_copy(vlms, pairs, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from visiontune.vlm.preference_forward import pair_logits
    from visiontune.vlm.preference_loss import sequence_logps

    cfg = _cfg(vlms["qwen2_vl"], pairs, tmp_path / "run")
    _, _, fit, trainer = _built(cfg)
    trainer.train()  # adapters now differ from zero, so "adapters off" is not the trained model
    entered, real = [], PeftModel.disable_adapter

    def spy(self):
        entered.append(self)
        return real(self)

    monkeypatch.setattr(PeftModel, "disable_adapter", spy)
    batch = fit.collator([fit.train_dataset[i] for i in range(2)])
    labels = batch.pop("labels")
    trainer.model.eval()
    ref = trainer.reference_logps(trainer.model, batch, labels)
    assert entered == [trainer.model]
    frozen = AutoModelForImageTextToText.from_pretrained(vlms["qwen2_vl"]).eval()
    with torch.no_grad():
        expected = sequence_logps(pair_logits(frozen, batch), labels).logps
        policy = sequence_logps(pair_logits(trainer.model, batch), labels).logps
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(policy, expected, atol=1e-4)  # the trained model is not its own reference


def test_full_tuning_reference_is_computed_once_cached_and_fixed(vlms, pairs, tmp_path, monkeypatch):
    import visiontune.vlm.preference_reference as reference

    calls, real = [], reference.compute_reference

    def spy(model, collator, dataset, batch_size=4):
        calls.append(len(dataset))
        return real(model, collator, dataset, batch_size)

    monkeypatch.setattr(reference, "compute_reference", spy)
    cfg = _cfg(vlms["idefics3"], pairs, tmp_path / "run", **{"tune.method": "full"})
    _, _, fit, trainer = _built(cfg)
    assert trainer.mode == "precomputed" and calls == [len(fit.train_dataset), len(fit.eval_dataset)]
    start = fit.train_dataset.reference.clone()
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 2
    batch = fit.collator([fit.train_dataset[0]])
    torch.testing.assert_close(batch["ref_logps"], torch.stack([start[0, 0], start[0, 1]]))
    trainer.train()
    assert torch.equal(fit.train_dataset.reference, start)  # the reference does not move with the policy
    _, _, again, _ = _built(_cfg(vlms["idefics3"], pairs, tmp_path / "run2", **{"tune.method": "full"}))
    assert len(calls) == 2 and torch.equal(again.train_dataset.reference, start)  # read back from the cache


def test_simpo_needs_no_reference(vlms, pairs, tmp_path):
    cfg = _cfg(vlms["llava"], pairs, tmp_path / "run", **{"loss.type": "simpo", "tune.method": "full"})
    _, _, fit, trainer = _built(cfg)
    assert trainer.mode == "none" and fit.train_dataset.reference is None
    trainer.train()
    assert all(math.isfinite(r["loss"]) for r in _logs(tmp_path / "run") if "loss" in r)


def test_only_the_last_answer_is_scored_and_cut_answers_are_refused_or_skipped(vlms, pairs, tmp_path):
    from visiontune.vlm.tokenize import IGNORE

    cfg = _cfg(vlms["qwen2_vl"], pairs, tmp_path / "run")
    task = TASKS["vlm_preference"].create()
    data = task.prepare(cfg).data
    for t in data.train_tokens:
        spans = [i for i, label in enumerate(t.chosen.labels) if label != IGNORE]
        assert spans == list(range(spans[0], spans[-1] + 1))  # one span: the answer and its end of turn
    width = max(len(t.chosen.input_ids) for t in data.train_tokens)
    with pytest.raises(DataError, match=r"pairs\.jsonl line \d+ is longer than data\.max_length"):
        task.prepare(_cfg(vlms["qwen2_vl"], pairs, tmp_path / "r2", **{"data.max_length": width - 1}))
    skipped = task.prepare(
        _cfg(vlms["qwen2_vl"], pairs, tmp_path / "r3", **{"data.max_length": width - 1, "data.on_bad_sample": "skip"})
    )
    assert skipped.data.skipped and all("longer than data.max_length" in why for _, why in skipped.data.skipped)


def test_a_loss_key_that_would_act_on_nothing_is_refused(vlms, pairs, tmp_path):
    with pytest.raises(RecipeError, match="loss.label_smoothing acts only with loss.type robust or simpo"):
        _cfg(vlms["qwen2_vl"], pairs, tmp_path, **{"loss.label_smoothing": 0.1})
    with pytest.raises(RecipeError, match="loss.simpo_gamma acts only with loss.type: simpo"):
        _cfg(vlms["qwen2_vl"], pairs, tmp_path, **{"loss.simpo_gamma": 1.0})
    _cfg(vlms["qwen2_vl"], pairs, tmp_path, **{"loss.type": "robust", "loss.label_smoothing": 0.1})


def test_a_whole_run_reports_rewards_before_and_after_with_their_curves(vlms, pairs, tmp_path):
    cfg = _cfg(vlms["idefics3"], pairs, tmp_path / "run")
    run = TASKS["vlm_preference"].create().train(cfg)
    after = json.loads((run / "eval" / "after.json").read_text())["metrics"]
    assert {"loss", "exact_match", *REWARDS} <= set(after)
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "plots" / "rewards.png").is_file()
    report = (run / "report.md").read_text()
    assert "## Preference rewards" in report and "plots/rewards.png" in report
