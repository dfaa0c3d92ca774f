"""End-to-end CLI runs on tiny local models: train -> eval -> predict -> report, run-folder safety, tuning modes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_train_eval_predict_report(tiny_recipe, write_recipe, cli, fixtures_dir):
    recipe = write_recipe(tiny_recipe())
    code, out, err = cli("train", recipe)
    assert code == 0, err
    run = Path(tiny_recipe()["output_dir"])
    for name in [
        "config.yaml",
        "metrics.jsonl",
        "report.md",
        "report.html",
        "summary.json",
        "eval/before.json",
        "eval/after.json",
        "eval/predictions.csv",
        "model/config.json",
        "model/model.safetensors",
        "model/visiontune.json",
    ]:
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard events in the run folder"
    assert list((run / "checkpoints").glob("checkpoint-*"))
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in logs) and any("eval_accuracy" in r for r in logs)
    assert any("before_accuracy" in r for r in logs)
    after = json.loads((run / "eval/after.json").read_text())
    assert len(after["confusion_matrix"]) == 3 and after["class_names"] == ["class_0", "class_1", "class_2"]
    assert sum(map(sum, after["confusion_matrix"])) == 9  # 25% of 36 images held out
    assert "report.md" in out

    # The saved model is a plain timm local-dir folder with the label names.
    import timm

    plain = timm.create_model(f"local-dir:{run / 'model'}", pretrained=True)
    assert plain.num_classes == 3 and plain.pretrained_cfg.get("label_names") == after["class_names"]

    code, out, err = cli("eval", run, "--data", fixtures_dir / "images")
    assert code == 0, err
    assert "accuracy" in out and (run / "eval/cli/predictions.csv").is_file()

    image = next((fixtures_dir / "images" / "class_1").glob("*.png"))
    code, out, err = cli("predict", run, image, "--top-k", "2")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].endswith(image.name) and len(lines) == 3 and "%" in lines[1]


@pytest.mark.random_model
def test_learns_the_task(tiny_recipe, write_recipe, cli):
    recipe = write_recipe(tiny_recipe(train={"epochs": 6}, data={"val_split": 0.25}))
    code, _, err = cli("train", recipe)
    assert code == 0, err
    run = Path(tiny_recipe()["output_dir"])
    before = json.loads((run / "eval/before.json").read_text())["metrics"]
    after = json.loads((run / "eval/after.json").read_text())["metrics"]
    assert after["accuracy"] >= 0.8 and after["loss"] < before["loss"]


def test_existing_run_folder_is_not_overwritten(tiny_recipe, write_recipe, cli):
    recipe = write_recipe(tiny_recipe(train={"max_steps": 2}))
    run = Path(tiny_recipe()["output_dir"])
    assert cli("train", recipe)[0] == 0
    marker = (run / "summary.json").read_text()
    code, _, err = cli("train", recipe)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (run / "summary.json").read_text() == marker
    assert cli("train", recipe, "--overwrite")[0] == 0


def test_hf_model_with_lora(tiny_recipe, write_recipe, cli, fixtures_dir):
    recipe = write_recipe(tiny_recipe(model=str(fixtures_dir / "hf-vit"), tune={"method": "lora", "lora": {"r": 4}}))
    code, _, err = cli("train", recipe)
    assert code == 0, err
    run = Path(tiny_recipe()["output_dir"])
    assert (run / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForImageClassification

    plain = AutoModelForImageClassification.from_pretrained(run / "model")
    assert plain.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert not any("lora" in n for n, _ in plain.named_parameters()), "LoRA was not merged into the saved model"


def test_lora_without_matching_modules_lists_names(tiny_recipe, write_recipe, cli):
    recipe = write_recipe(tiny_recipe(tune={"method": "lora", "lora": {"target_modules": ["nope"]}}))
    code, _, err = cli("train", recipe)
    assert code == 2 and "match no Linear layer" in err and "qkv" in err


def test_linear_probe_trains_only_the_head(tiny_recipe, write_recipe, cli, fixtures_dir):
    recipe = write_recipe(tiny_recipe(tune={"method": "linear_probe"}, train={"max_steps": 4}))
    assert cli("train", recipe)[0] == 0
    trained = _weights(Path(tiny_recipe()["output_dir"]))
    original = load_file(str(fixtures_dir / "timm-vit" / "model.safetensors"))
    body = [k for k in trained if not k.startswith("head")]
    assert body and all(torch.equal(trained[k], original[k]) for k in body)
    assert trained["head.weight"].shape == (3, 32)


def test_gradual_unfreeze_follows_schedule(tiny_recipe, write_recipe, cli, fixtures_dir):
    schedule = [{"epoch": 0, "blocks": 0}, {"epoch": 1, "blocks": "all"}]
    recipe = write_recipe(
        tiny_recipe(
            tune={"method": "gradual_unfreeze", "unfreeze": schedule}, train={"epochs": 2, "save_total_limit": 5}
        )
    )
    assert cli("train", recipe)[0] == 0
    run = Path(tiny_recipe()["output_dir"])
    original = load_file(str(fixtures_dir / "timm-vit" / "model.safetensors"))
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    after_epoch0, final = (
        {k.removeprefix("backbone."): v for k, v in load_file(str(c / "model.safetensors")).items()}
        for c in (checkpoints[0], checkpoints[-1])
    )
    body = [k for k in original if not k.startswith("head")]
    assert all(torch.equal(after_epoch0[k], original[k]) for k in body), "body moved while frozen"
    assert not torch.equal(after_epoch0["head.weight"][:3], original["head.weight"][:3])
    assert len(checkpoints) == 2
    assert any(not torch.equal(final[k], original[k]) for k in body), "body never unfroze"


def test_ema_strong_augment_and_layer_decay(tiny_recipe, write_recipe, cli):
    recipe = write_recipe(
        tiny_recipe(
            data={"augment": {"preset": "strong"}},
            tune={"layer_decay": 0.7},
            train={"ema": {"decay": 0.9}, "max_steps": 4, "label_smoothing": 0.1},
        )
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    run = Path(tiny_recipe()["output_dir"])
    after = json.loads((run / "eval/after.json").read_text())
    assert after["weights"] in ("ema", "trained")
    logs = (run / "metrics.jsonl").read_text()
    assert "final_ema_accuracy" in logs and "final_trained_accuracy" in logs


@pytest.mark.parametrize("model", ["timm:definitely_not_a_model", "some-org/not-in-cache", "builtin:resnet-9000"])
def test_unresolvable_model_is_one_sentence(model, tiny_recipe, write_recipe, cli):
    code, _, err = cli("train", write_recipe(tiny_recipe(model=model)))
    assert code == 2 and "Traceback" not in err
    assert model.split(":")[-1] in err


def test_bad_image_stops_before_training_then_skip_reports_it(tiny_recipe, write_recipe, cli, fixtures_dir, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(fixtures_dir / "images", images)
    (images / "class_2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    recipe = tiny_recipe(data={"train": str(images)}, train={"max_steps": 2})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 2 and "broken.png" in err and "on_bad_sample" in err and "Traceback" not in err
    run = Path(recipe["output_dir"])
    assert not list(run.glob("checkpoints/checkpoint-*")), "training started despite a bad sample"

    code, _, err = cli("train", write_recipe(recipe), "data.on_bad_sample=skip", "--overwrite")
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert [s["ref"].endswith("broken.png") for s in summary["skipped_samples"]] == [True]
    assert "broken.png" in (run / "report.md").read_text()


def test_bf16_grad_checkpointing_and_wandb_offline(tiny_recipe, write_recipe, cli):
    recipe = tiny_recipe(
        train={"precision": "bf16", "grad_checkpointing": True, "max_steps": 2},
        track={"wandb": True, "wandb_mode": "offline"},
    )
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run written"


def test_fixtures_command_writes_loadable_models(cli, tmp_path):
    code, out, err = cli("fixtures", tmp_path / "fx")
    assert code == 0, err
    from visiontune.classify.resolve import resolve_classifier

    for name in ("timm-vit", "timm-cnn", "hf-vit"):
        assert name in out
        model = resolve_classifier(str(tmp_path / "fx" / name), ["a", "b"]).eval()
        assert model(torch.zeros(1, 3, 32, 32))["logits"].shape == (1, 2)
