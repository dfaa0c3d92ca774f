"""clip_classify on tiny CLIP / SigLIP fixtures: zero-shot head, full / LoRA / L-LoRA training, WiSE-FT."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visiontune.clip.dual_encoder import resolve_dual_encoder
from visiontune.clip.zero_shot import CLIPClassifier, zero_shot_head
from visiontune.core.errors import ModelError

NAMES = ["red", "green", "blue"]  # the fixture images' class colours, words the tiny tokenizer knows


@pytest.fixture
def clip_recipe(fixtures_dir, tmp_path):
    def make(family: str = "clip", **sections) -> dict:
        config = {
            "task": "clip_classify",
            "model": str(fixtures_dir / family),
            "output_dir": str(tmp_path / "run"),
            "data": {
                "train": str(fixtures_dir / "images"),
                "val_split": 0.25,
                "augment": {"preset": "none"},
                "workers": 0,
                "prompt_names": NAMES,
                "templates": ["a photo of a {}", "a {} image"],
            },
            "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "logging_steps": 1},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
        return config

    return make


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zero_shot_head_matches_hand_computation(family, fixtures_dir):
    encoder = resolve_dual_encoder(str(fixtures_dir / family))
    templates = ["a photo of a {}", "a {} image"]
    head = zero_shot_head(encoder, NAMES, templates)
    model = encoder.model.eval()
    expected = []
    for name in NAMES:
        batch = encoder.tokenize([t.format(name) for t in templates])
        with torch.no_grad():
            out = model.get_text_features(**batch)
        emb = F.normalize(getattr(out, "pooler_output", out), dim=-1).mean(0)
        expected.append(emb / emb.norm())
    torch.testing.assert_close(head, torch.stack(expected))

    clf = CLIPClassifier(encoder, NAMES, templates).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        logits = clf(pixels)["logits"]
    torch.testing.assert_close(logits, model.logit_scale.exp() * image @ head.T)


@pytest.mark.random_model
@pytest.mark.parametrize("method", ["full", "lora", "l_lora"])
def test_train_records_zero_shot_then_fine_tuned(method, clip_recipe, write_recipe, cli):
    tune = {"method": method, **({"lora": {"r": 4}} if method != "full" else {})}  # tune.lora acts only with LoRA
    recipe = clip_recipe(tune=tune, train={"lr": 5e-3 if method != "full" else 1e-3})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    before = json.loads((run / "eval/before.json").read_text())["metrics"]
    after = json.loads((run / "eval/after.json").read_text())["metrics"]
    assert after["loss"] < before["loss"], (before, after)
    meta = json.loads((run / "model/visiontune.json").read_text())
    assert meta["class_names"] == NAMES and ("l_lora" in meta) == (method == "l_lora")
    # The saved model reproduces the recorded after-training metrics through the eval command.
    from visiontune.clip.classify import ClipClassifyTask

    task = ClipClassifyTask()
    clf = task.load_model(str(run), NAMES)
    from visiontune.classify.task import load_split
    from visiontune.recipe import load_recipe

    split = load_split(load_recipe(write_recipe(recipe)))
    again = task.evaluate_loaded(clf, split.val)["metrics"]
    assert again["loss"] == pytest.approx(after["loss"], rel=1e-4)
    if method == "lora":
        assert (run / "adapter" / "adapter_config.json").is_file()


def test_text_tower_is_untouched(clip_recipe, write_recipe, cli, fixtures_dir):
    recipe = clip_recipe(train={"max_steps": 3})
    assert cli("train", write_recipe(recipe))[0] == 0
    from transformers import CLIPModel

    base = CLIPModel.from_pretrained(fixtures_dir / "clip").state_dict()
    tuned = CLIPModel.from_pretrained(Path(recipe["output_dir"]) / "model").state_dict()
    assert all(torch.equal(base[k], tuned[k]) for k in base if k.startswith("text_"))
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith("vision_model."))


def test_skip_training_reports_zero_shot(clip_recipe, write_recipe, cli):
    recipe = clip_recipe(skip_training=True, family="siglip")
    del recipe["train"], recipe["data"]["augment"], recipe["data"]["workers"]  # they act only when training
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    assert "accuracy" in json.loads((run / "eval/after.json").read_text())["metrics"]
    assert (run / "report.md").is_file() and not (run / "checkpoints").exists()


@pytest.mark.random_model
def test_wise_ft_endpoints_reproduce_zero_shot_and_fine_tuned(
    clip_recipe, write_recipe, cli, fixtures_dir, monkeypatch
):
    """The sweep's α = 0 and α = 1 score the validation data as the evaluations before and after training did. Their
    losses are compared: the accuracies of a tiny random CLIP rest on near-ties that the sweep's other batch size
    can break the other way."""
    from visiontune.clip.classify import ClipClassifyTask

    scored, real = [], ClipClassifyTask.evaluate_loaded
    monkeypatch.setattr(
        ClipClassifyTask, "evaluate_loaded", lambda *args, **kwargs: scored.append(real(*args, **kwargs)) or scored[-1]
    )
    recipe = clip_recipe(
        wise_ft={"alphas": [0.0, 0.5, 1.0], "control": str(fixtures_dir / "images")}, train={"max_steps": 4, "lr": 1e-2}
    )
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    rows = json.loads((run / "eval/wise_ft.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0] and "control_accuracy" in rows[1]
    target = [report["metrics"] for report in scored[-6::2]]  # each α: the target data, then the control data
    assert [m["accuracy"] for m in target] == [r["target_accuracy"] for r in rows]
    before = json.loads((run / "eval/before.json").read_text())["metrics"]
    after = json.loads((run / "eval/after.json").read_text())["metrics"]
    assert target[0]["loss"] == pytest.approx(before["loss"], rel=1e-5)
    assert target[2]["loss"] == pytest.approx(after["loss"], rel=1e-5)
    assert abs(before["loss"] - after["loss"]) > 1e-3  # the two endpoints are told apart
    assert (run / "wise_ft_model" / "visiontune.json").is_file() and (run / "plots" / "wise_ft.png").is_file()
    assert "WiSE-FT" in (run / "report.md").read_text()


def test_not_a_dual_encoder_names_the_right_task(clip_recipe, write_recipe, cli, fixtures_dir):
    code, _, err = cli("train", write_recipe(clip_recipe(model=str(fixtures_dir / "hf-vit"))))
    assert code == 2 and "not a CLIP-style dual encoder" in err and "task: classify" in err


def test_lora_targets_that_match_nothing_list_what_exists(clip_recipe, write_recipe, cli):
    code, _, err = cli("train", write_recipe(clip_recipe(tune={"method": "lora", "lora": {"target_modules": ["qkv"]}})))
    assert code == 2 and "q_proj" in err and "k_proj" in err


def test_bad_templates_and_prompt_names_are_refused(clip_recipe, write_recipe, cli):
    code, _, err = cli("validate", write_recipe(clip_recipe(data={"templates": ["no placeholder"]})))
    assert code == 2 and "{}" in err
    code, _, err = cli("validate", write_recipe(clip_recipe(data={"prompt_names": ["red", "red", "blue"]})))
    assert code == 2 and "duplicates" in err
    code, _, err = cli("train", write_recipe(clip_recipe(data={"prompt_names": ["red", "green"]})))
    assert code == 2 and "prompt_names" in err


def test_unresolvable_model_is_refused():
    with pytest.raises(ModelError, match="offline"):
        resolve_dual_encoder("openai/clip-not-cached")


def test_lora_merge_gives_the_same_embeddings(fixtures_dir, tmp_path):
    from visiontune.clip.classify import load_clip_classifier
    from visiontune.clip.config import ClipLoraConfig
    from visiontune.clip.vision_lora import apply_vision_lora

    clf = CLIPClassifier(resolve_dual_encoder(str(fixtures_dir / "clip")), NAMES, "builtin")
    apply_vision_lora(clf, ClipLoraConfig(r=4, dropout=0.0), linearize=False)
    with torch.no_grad():
        for name, p in clf.vision.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter, so merging actually changes weights
    pixels = torch.randn(4, 3, 32, 32)
    clf.eval()
    with torch.no_grad():
        adapted = clf.vision(pixels)
    clf.save(tmp_path / "merged", adapter_dir=tmp_path / "adapter")
    reloaded = load_clip_classifier(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.vision(pixels), adapted, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
