"""`visiontune plan` of a vlm_preference recipe with `init_from` an assembled run: the table and plan.json count
the assembled model (not nothing, not a transformers VLM), the tokens per pair (both answers, padded together), and
the memory of one model: with LoRA the reference is the adapters switched off, so the frozen weights are the start
model's and nothing else; with full tuning the reference is precomputed log-probs, no copy either."""

import json

import pytest

from tests.vlm.test_preference_assembled import _isolated, _raw, world  # noqa: F401 - shared fixtures


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_plan_of_an_assembled_preference_recipe(world, write_recipe, cli, tmp_path, method):  # noqa: F811
    from visiontune.recipe import parse_config
    from visiontune.vlm.assembled import load_assembled
    from visiontune.vlm.preference import VlmPreferenceTask
    from visiontune.vlm.preference_assembled import tune_assembled

    raw = _raw(world, tmp_path / "run", tune={"method": method})
    recipe = write_recipe(raw, "pref.yaml")
    code, out, err = cli("plan", recipe, "--out", tmp_path / "plan.json")
    assert code == 0, err
    assert "vlm_preference on cpu" in out and "tokens/pair" in out and "memory (estimate)" in out
    assert not (tmp_path / "run").exists()  # a plan trains and saves nothing
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == method and plan["time"]["optimizer_steps"] == 2

    # tokens: the records are both answers of each training pair, as the task tokenised them
    cfg = parse_config(raw)
    start, processor = load_assembled(world["run"] / "model")
    pairs = VlmPreferenceTask().prepare(cfg).data.train_tokens
    tokens = plan["tokens"]
    per_pair = [len(p.chosen) + len(p.rejected) for p in pairs]
    assert tokens["pairs"] == plan["samples"]["train_samples"] == len(pairs) and tokens["records"] == 2 * len(pairs)
    assert tokens["tokens_per_pair"]["min"] == min(per_pair) and tokens["tokens_per_pair"]["max"] == max(per_pair)
    image_tokens = pairs[0].chosen.input_ids.count(processor.image_token_id)
    assert tokens["image_tokens_per_record"]["max"] == image_tokens > 0
    assert tokens["trained_tokens"] == sum(
        sum(t != -100 for t in r.labels) for p in pairs for r in (p.chosen, p.rejected)
    )

    # parameters and weights: the start model once, plus what training adds (LoRA, the trained projector's copy)
    tuned = tune_assembled(load_assembled(world["run"] / "model")[0], cfg.tune)
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert plan["parameters"] == {"trainable": trainable, "frozen": _numel(tuned) - trainable}
    added = _numel(tuned) - _numel(start)
    if method == "lora":  # LoRA's A and B and the projector copy PEFT trains (modules_to_save); the original stays
        assert plan["parameters"]["frozen"] == _numel(start) and added == trainable > _numel(start.projector)
    else:  # full tuning: the start model itself trains (projector and language), the vision tower is frozen
        assert added == 0 and plan["parameters"]["frozen"] == _numel(start.vision)
    assert plan["memory"]["weights"] == _bytes(start) + 4 * added  # fp32: no second model for the reference
    assert plan["memory"]["gradients"] == 4 * trainable and plan["memory"]["optimizer"] == 8 * trainable
    assert plan["memory"]["measured_peak"] > plan["memory"]["weights"]
    # full tuning's pass over every pair for the reference log-probs is timed and counted, not run, nor cached
    assert ("expected_setup_s" in plan["time"]) == (method == "full") and ("of which setup" in out) == (
        method == "full"
    )
    assert not (tmp_path / "cache" / "reference").exists()


def test_the_plan_times_the_reference_pass_on_a_few_batches(monkeypatch):
    import torch

    import visiontune.vlm.preference_reference as reference

    seen = []

    def compute(model, collator, subset, batch_size=4):
        seen.append(list(subset.indices))
        return torch.full((len(subset), 2), -1.0)

    monkeypatch.setattr(reference, "compute_reference", compute)
    ref, seconds = reference.timed_reference(None, None, list(range(100)), batches=3, batch_size=4)
    assert seen == [[0, 1, 2, 3], list(range(4, 16))]  # a warm-up batch, then three timed ones
    assert ref.shape == (100, 2) and (ref[:16] == -1).all() and (ref[16:] == 0).all()
    assert seconds >= 0
