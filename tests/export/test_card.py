"""Model cards: every model folder a run or an export leaves gets a Hub-format README.md whose metadata comes from
the run (recipe, eval/after.json) and whose loading code runs with the plain library and predicts what visiontune
predicts (the top probability is compared, atol 1e-4, so a near-tie of a random model's logits cannot flip it)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

ATOL = 1e-4


def _photo(folder):
    path = folder / "image.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def run_card_code(card_path, monkeypatch, capsys) -> list[str]:
    """Run every ```python block of the card from the model folder's parent (where its relative name resolves),
    with an image.jpg there; returns the printed lines."""
    from visiontune.export.card import code_blocks

    folder = card_path.parent.parent
    _photo(folder)
    monkeypatch.chdir(folder)
    capsys.readouterr()
    blocks = code_blocks(card_path.read_text())
    assert blocks, "the card has no python code"
    for code in blocks:
        exec(compile(code, str(card_path), "exec"), {"__name__": "__card__"})  # noqa: S102 - the test's purpose
    return capsys.readouterr().out.strip().splitlines()


def _fake_run(tmp_path, model_dir, recipe: dict, metrics: dict):
    """A run folder as training leaves it, for what the card reads: model/, config.yaml, eval/after.json."""
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    (run / "eval").mkdir()
    (run / "eval" / "after.json").write_text(json.dumps({"metrics": metrics, "weights": "trained"}))
    return run


def _top_prob(model: str, image, task: str = "classify") -> tuple[str, float]:
    from visiontune.recipe import get_task

    (result,) = get_task(task).predict(model, [str(image)], top_k=1)
    return result["top"][0]


@pytest.mark.random_model
def test_training_writes_a_card_whose_timm_code_runs(cli, tiny_recipe, write_recipe, tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    config = tiny_recipe(train={"epochs": 1})
    code, _, err = cli("train", write_recipe(config))
    assert code == 0, err
    run = tmp_path / "run"
    card = ModelCard.load(run / "model" / "README.md")
    after = json.loads((run / "eval" / "after.json").read_text())["metrics"]
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification" and data.license
    assert data.model_name == "run"  # the run folder's name
    assert {"visiontune", "classify"} <= set(data.tags)
    assert {r.metric_type: r.metric_value for r in data.eval_results} == pytest.approx(after)
    assert "```yaml\ntask: classify" in card.text and str(config["data"]["train"]) in card.text
    label, prob = run_card_code(run / "model" / "README.md", monkeypatch, capsys)[-1].rsplit(" ", 1)
    _, expected = _top_prob(str(run), run / "image.jpg")
    assert label in card.text and float(prob) == pytest.approx(expected, abs=ATOL)


def test_transformers_classifier_card(fixtures_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    from visiontune.classify.resolve import resolve_classifier
    from visiontune.export.card import write_model_card

    recipe = {"task": "classify", "model": "google/vit-base-patch16-224", "data": {"train": "user/pets", "val": None}}
    resolve_classifier(str(fixtures_dir / "hf-vit")).save(tmp_path / "saved")  # as a classify run saves it
    run = _fake_run(tmp_path, tmp_path / "saved", recipe, {"accuracy": 0.5, "loss": 1.25})
    path = write_model_card(run / "model")
    data = ModelCard.load(path).data
    assert data.base_model == "google/vit-base-patch16-224" and data.datasets == ["user/pets"]
    assert data.library_name == "transformers" and data.eval_results[0].dataset_type == "user/pets"
    label, prob = run_card_code(path, monkeypatch, capsys)[-1].rsplit(" ", 1)
    _, expected = _top_prob(str(run / "model"), run / "image.jpg")
    assert float(prob) == pytest.approx(expected, abs=ATOL)
    # for the Hub the same card loads by repo id
    hub = write_model_card(run / "model", repo_id="someone/vit-pets").read_text()
    assert 'from_pretrained("someone/vit-pets")' in hub and "- name: someone/vit-pets" in hub  # model-index


def test_clip_card_zero_shot_code(fixtures_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    from visiontune.export.card import write_model_card

    recipe = {"task": "clip_contrastive", "model": str(fixtures_dir / "clip"), "data": {"train": "builtin:x"}}
    run = _fake_run(tmp_path, fixtures_dir / "clip", recipe, {"recall@1": 0.25})
    path = write_model_card(run / "model")
    data = ModelCard.load(path).data
    assert data.pipeline_tag == "zero-shot-image-classification" and data.base_model is None  # a local path
    assert data.datasets is None  # builtin: is no Hub dataset
    label, prob = run_card_code(path, monkeypatch, capsys)[-1].rsplit(" ", 1)
    assert label in ("cat", "dog") and 0 < float(prob) <= 1


def test_peft_vlm_card_code_generates(tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visiontune.core.manifest import write_manifest
    from visiontune.export.card import write_model_card
    from visiontune.testing.vlm_fixtures import tiny_vlm

    base = tiny_vlm("idefics3", tmp_path / "base")
    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])
    )
    adapter = tmp_path / "run" / "adapter"
    model.save_pretrained(adapter)
    AutoProcessor.from_pretrained(base).save_pretrained(adapter)
    write_manifest(adapter, "vlm", base_model=str(base), tune="lora")
    path = write_model_card(adapter)
    text = path.read_text()
    assert "library_name: peft" in text and "pipeline_tag: image-text-to-text" in text
    run_card_code(path, monkeypatch, capsys)  # loads base + adapter, generates from the image: no error is the check
