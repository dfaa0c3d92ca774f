"""vlm_assemble on tiny parts (CLIP / timm vision towers, Qwen2 / Llama LMs built from configs): image-token
bookkeeping for every projector, gradients per stage, the MoE balance term, save/load and LLaVA export parity,
stage-1 → stage-2 hand-over, scheduled sampling in the trainer, and the bad inputs of the issue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_same_greedy, fixture_seed
from visiontune.core.errors import DataError, ModelError, RecipeError
from visiontune.recipe import parse_config
from visiontune.vlm.assemble import VlmAssembleTask, load_model, optimizer_for, set_trainable
from visiontune.vlm.assembled import build_assembled, load_assembled
from visiontune.vlm.projectors import PROJECTORS

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    from visiontune.testing.fixtures import tiny_clip, tiny_timm_cnn
    from visiontune.testing.vlm_fixtures import tiny_causal_lm

    out = tmp_path_factory.mktemp("assemble-parts")
    with fixture_seed():
        return {
            "clip": tiny_clip(out / "clip"),
            "cnn": tiny_timm_cnn(out / "cnn"),
            "qwen2": tiny_causal_lm("qwen2", out / "qwen2"),
            "llama": tiny_causal_lm("llama", out / "llama"),
        }


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> dict[str, Path]:
    """24 noisy colour squares: caption CSV (align) and LLaMA-Factory-style Q/A JSON (instruct)."""
    root = tmp_path_factory.mktemp("colours")
    rows, qa = ["image,caption"], []
    for i in range(24):
        name = list(COLOURS)[i % 3]
        noise = np.random.default_rng(i).integers(-20, 20, (32, 32, 3))
        Image.fromarray((np.array(COLOURS[name]) + noise).clip(0, 255).astype("uint8")).save(root / f"{i}.png")
        rows.append(f"{i}.png,a {name} square")
        qa.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>What colour is it?"},
                    {"role": "assistant", "content": name},
                ],
                "images": [f"{i}.png"],
            }
        )
    (root / "captions.csv").write_text("\n".join(rows))
    (root / "qa.json").write_text(json.dumps(qa))
    return {"captions": root / "captions.csv", "qa": root / "qa.json", "root": root}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


def _batch(processor, answer: str | None = "red"):
    messages = QUESTION + ([{"role": "assistant", "content": [{"type": "text", "text": answer}]}] if answer else [])
    text = processor.apply_chat_template(messages, add_generation_prompt=answer is None)
    return processor(text=[text], images=[Image.new("RGB", (40, 30), "red")], return_tensors="pt")


def _recipe(parts, data, tmp_path, stage="align", **extra) -> dict:
    recipe = {
        "task": "vlm_assemble",
        "stage": stage,
        "output_dir": str(tmp_path / stage),
        "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "logging_steps": 1, "warmup_ratio": 0.0},
        "eval": {"max_new_tokens": 3, "max_samples": 3},
    }
    if stage == "align":
        recipe |= {
            "vision": str(parts["clip"]),
            "language": str(parts["qwen2"]),
            "data": {"train": str(data["captions"]), "val_split": 0.2},
        }
    else:
        recipe |= {"data": {"train": str(data["qa"]), "val_split": 0.2}}
    for key, value in extra.items():
        recipe[key] = recipe[key] | value if isinstance(value, dict) and key in recipe else value
    return recipe


@pytest.mark.parametrize("kind", PROJECTORS)
@pytest.mark.parametrize("vision", ["clip", "cnn"])
def test_image_tokens_match_projector_output(parts, kind, vision):
    source = str(parts[vision]) if vision == "clip" else f"timm:local-dir:{parts[vision]}"
    model, processor = build_assembled(source, str(parts["qwen2"]), {"kind": kind, "options": {}})
    batch = _batch(processor)
    n_image = int((batch["input_ids"] == processor.image_token_id).sum())
    features = model.vision(batch["pixel_values"])  # [1, N, Dv]
    assert n_image == processor.num_image_tokens == model.projector(features).shape[1]
    if vision == "clip":
        assert features.shape[1] == 16  # 32 px / patch 8 = 4 x 4, CLS dropped
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


def _grads(model, batch) -> set[str]:
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    parts = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum()}
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    return parts


@pytest.mark.parametrize(
    ("stage", "language", "expected"),
    [
        ("align", "lora", {"projector"}),
        ("instruct", "frozen", {"projector"}),
        ("instruct", "full", {"projector", "language"}),
        ("instruct", "lora", {"projector", "language"}),
    ],
)
def test_gradients_flow_only_where_the_stage_says(parts, colour_data, tmp_path, stage, language, expected):
    recipe = _recipe(parts, colour_data, tmp_path, "align") | {"stage": stage, "tune": {"language": language}}
    cfg = parse_config(recipe)
    model, processor = load_model(cfg)
    model = set_trainable(model, cfg)
    assert _grads(model, _batch(processor)) == expected
    if language == "lora" and stage == "instruct":
        trained = [n for n, p in model.language.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n in trained)


def test_vision_full_trains_the_encoder_at_its_own_lr_and_keeps_batchnorm_statistics(parts, colour_data, tmp_path):
    recipe = _recipe(parts, colour_data, tmp_path, "instruct") | {
        "vision": f"timm:local-dir:{parts['cnn']}",
        "language": str(parts["qwen2"]),
        "tune": {"vision": "full", "vision_lr_scale": 0.1},
    }
    cfg = parse_config(recipe)
    model, processor = load_model(cfg)
    model = set_trainable(model, cfg)
    batch = _batch(processor)
    norms = [m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in norms]
    model.train()
    assert _grads(model, batch) == {"vision", "projector", "language"}  # a training forward
    optimizer = optimizer_for(cfg)(model)
    vision = {id(p) for p in model.vision.parameters()}
    assert {g["lr"] for g in optimizer.param_groups if id(g["params"][0]) in vision} == {0.1 * cfg.train.lr}
    assert {g["lr"] for g in optimizer.param_groups if id(g["params"][0]) not in vision} == {cfg.train.lr}
    weights = [p.detach().clone() for p in model.vision.parameters()]
    optimizer.step()
    assert norms and not any(m.training for m in norms)  # statistics as pretrained: batches of 8 cannot estimate them
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, norms, strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(weights, model.vision.parameters(), strict=True))


def test_vision_full_is_saved_and_frozen_vision_refuses_its_lr_scale(parts, colour_data, tmp_path):
    recipe = _recipe(parts, colour_data, tmp_path, "instruct") | {
        "vision": f"timm:local-dir:{parts['cnn']}",
        "language": str(parts["qwen2"]),
        "tune": {"vision": "full"},
        "train": {"epochs": 1, "batch_size": 4, "lr": 3e-3, "logging_steps": 1, "warmup_ratio": 0.0},
    }
    start, _ = load_model(parse_config(recipe))
    run = VlmAssembleTask().train(parse_config(recipe))
    trained, _ = load_assembled(run / "model")
    moved = [
        not torch.equal(a, b)
        for a, b in zip(start.vision.state_dict().values(), trained.vision.state_dict().values(), strict=True)
    ]
    assert any(moved)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"]["vision"] == sum(p.numel() for p in start.vision.parameters())
    with pytest.raises(RecipeError, match="tune.vision_lr_scale"):
        parse_config(recipe | {"tune": {"vision_lr_scale": 0.5}})


def test_plan_names_how_each_part_is_tuned(parts, colour_data, tmp_path):
    from visiontune.plan.make import method

    instruct = _recipe(parts, colour_data, tmp_path, "instruct", vision="x", language="y", tune={"vision": "full"})
    assert method(parse_config(instruct)) == "instruct: vision full, projector, language lora"
    assert method(parse_config(_recipe(parts, colour_data, tmp_path, "align"))) == "align: projector"


def test_moe_balance_loss_is_added_to_the_lm_loss(parts):
    model, processor = build_assembled(str(parts["clip"]), str(parts["qwen2"]), {"kind": "moe", "options": {}})
    batch = _batch(processor)
    total = model(**batch, labels=batch["input_ids"]).loss
    lm_only = model.language(
        inputs_embeds=model.embed(batch["input_ids"], batch["pixel_values"]),
        attention_mask=batch["attention_mask"],
        labels=batch["input_ids"],
    ).loss
    assert model.balance_loss is not None and model.balance_loss >= 1.0 - 1e-6  # 1 at perfect balance
    assert torch.allclose(total - lm_only, torch.tensor(model.projector.balance_coef * model.balance_loss), atol=1e-6)


@pytest.mark.parametrize("vision", ["clip", "cnn"])
def test_save_and_load_give_identical_logits(parts, tmp_path, vision):
    source = str(parts[vision]) if vision == "clip" else f"timm:local-dir:{parts[vision]}"
    model, processor = build_assembled(source, str(parts["llama"]), {"kind": "patch_reducer", "options": {}})
    model.eval().save_pretrained(tmp_path / "saved", processor)
    loaded, loaded_processor = load_assembled(tmp_path / "saved")
    batch, again = _batch(processor), _batch(loaded_processor)
    assert torch.equal(batch["input_ids"], again["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**again).logits, atol=1e-6)


@pytest.mark.random_model
@pytest.mark.parametrize("lm", ["qwen2", "llama"])
def test_llava_export_loads_in_plain_transformers_with_identical_logits_and_generation(parts, tmp_path, lm):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visiontune.vlm.llava_export import export_llava

    model, processor = build_assembled(str(parts["clip"]), str(parts[lm]), {"kind": "mlp2x_gelu"}, vision_layer=-2)
    with torch.no_grad():  # a trained-looking projector, so parity is not a property of the initialisation
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    export_llava(model.eval(), processor, tmp_path / "llava")
    llava = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    llava_processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    ours, theirs = _batch(processor, None), _batch(llava_processor, None)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model(**ours).logits, llava(**theirs).logits, atol=1e-5)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    theirs_out = llava.generate(**theirs, **greedy, output_logits=True, return_dict_in_generate=True)
    assert_same_greedy(model.generate(**ours, **greedy), theirs_out, ours["input_ids"].shape[1], tol=1e-5)


def test_llava_export_refuses_projectors_llava_cannot_hold(parts, tmp_path):
    from visiontune.vlm.llava_export import export_llava

    model, processor = build_assembled(str(parts["clip"]), str(parts["qwen2"]), {"kind": "moe"})
    with pytest.raises(ModelError, match="projector is not mlp2x_gelu"):
        export_llava(model, processor, tmp_path / "llava")


@pytest.mark.random_model
def test_align_then_instruct_end_to_end(parts, colour_data, tmp_path):
    align_run = VlmAssembleTask().train(parse_config(_recipe(parts, colour_data, tmp_path, "align")))
    # The projector learns the toy captions: the validation loss falls (6.18 -> 6.10, with any ATEN_CPU_CAPABILITY). Not
    # the first and last training batches': those differ by their captions about as much as training moves them.
    before, after = (json.loads((align_run / "eval" / f"{n}.json").read_text())["metrics"] for n in ("before", "after"))
    assert after["loss"] < before["loss"] - 0.02
    summary = json.loads((align_run / "summary.json").read_text())
    assert summary["trainable_parameters"]["language"] == 0 and summary["trainable_parameters"]["vision"] == 0
    assert (align_run / "llava" / "config.json").is_file()
    checkpoint = next((align_run / "checkpoints").glob("checkpoint-*/model.safetensors"))
    from safetensors.torch import load_file

    assert {k.split(".")[0] for k in load_file(checkpoint)} == {"projector"}  # frozen weights stay out

    recipe = _recipe(
        parts,
        colour_data,
        tmp_path,
        "instruct",
        init_from=str(align_run),
        scheduled_sampling={"schedule": "linear", "start": 1.0, "end": 0.0},
    )
    instruct_run = VlmAssembleTask().train(parse_config(recipe))
    stage_one, _ = load_assembled(align_run / "model")
    start, _ = load_model(parse_config(recipe))
    assert all(
        torch.equal(a, b)
        for a, b in zip(stage_one.projector.state_dict().values(), start.projector.state_dict().values(), strict=True)
    )
    ratios = [
        json.loads(line)["teacher_forcing_ratio"]
        for line in (instruct_run / "metrics.jsonl").read_text().splitlines()
        if "teacher_forcing_ratio" in line
    ]
    assert ratios[0] == 1.0 and ratios[-1] < ratios[0]
    assert (instruct_run / "adapter" / "adapter_config.json").is_file()
    assert (instruct_run / "eval" / "text_only.json").is_file()  # the LM alone, images removed
    from visiontune.vlm.generate import evaluate_model

    report = evaluate_model(str(instruct_run), str(colour_data["qa"]), max_new_tokens=3)
    assert len(report["samples"]) == 24


def test_cli_eval_picks_the_task_recorded_in_the_run(parts, colour_data, tmp_path, cli):
    recipe = _recipe(parts, colour_data, tmp_path, "align")
    recipe["train"] |= {"max_steps": 1}
    run = VlmAssembleTask().train(parse_config(recipe))
    code, out, err = cli("eval", run, "--data", colour_data["qa"])
    assert code == 0, err
    assert "exact_match" in out and (run / "eval" / "cli" / "generation.json").is_file()


def test_instruct_from_a_folder_that_is_not_stage_one_is_refused(parts, colour_data, tmp_path):
    recipe = _recipe(parts, colour_data, tmp_path, "instruct", init_from=str(parts["qwen2"]))
    with pytest.raises(RecipeError, match="not the output of a vlm_assemble align run"):
        load_model(parse_config(recipe))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("vision", "/nonexistent/clip", "vision: /nonexistent/clip cannot be resolved"),
        ("language", "/nonexistent/lm", "language: /nonexistent/lm cannot be resolved"),
        ("vision", "nobody/clip-not-cached", r"vision: nobody/clip-not-cached cannot be resolved offline .*timm:NAME"),
    ],
)
def test_unresolvable_parts_name_their_key(parts, colour_data, tmp_path, key, value, match):
    recipe = _recipe(parts, colour_data, tmp_path, "align") | {key: value}
    with pytest.raises(ModelError, match=match):
        load_model(parse_config(recipe))


def test_empty_caption_names_the_record(parts, colour_data, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,caption\n{colour_data['root'] / '0.png'},a red square\n{colour_data['root'] / '1.png'}, \n")
    recipe = _recipe(parts, colour_data, tmp_path, "align")
    recipe["data"] = {"train": str(bad), "val_split": 0}
    del recipe["eval"]  # no validation data: the eval keys would act on nothing
    with pytest.raises(DataError, match="empty caption"):
        VlmAssembleTask().train(parse_config(recipe))


def test_recipe_needs_its_sources():
    with pytest.raises(RecipeError, match="set both `vision` and `language`"):
        parse_config({"task": "vlm_assemble", "stage": "align", "output_dir": "x", "data": {"train": "y"}})


def test_resume_from_a_projector_only_checkpoint_matches_the_uninterrupted_run(parts, colour_data, tmp_path):
    import shutil

    from safetensors.torch import load_file

    recipe = _recipe(parts, colour_data, tmp_path, "align")
    recipe["train"] |= {"max_steps": 4, "eval_steps": 2, "save_total_limit": 5}
    recipe["eval"] = {"max_samples": 1, "max_new_tokens": 1}
    whole = VlmAssembleTask().train(parse_config(recipe))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(whole, interrupted)
    for later in ("model", "llava", "eval", "summary.json"):  # as if killed right after checkpoint-2
        shutil.rmtree(interrupted / later) if (interrupted / later).is_dir() else (interrupted / later).unlink()
    shutil.rmtree(interrupted / "checkpoints" / "checkpoint-4")
    VlmAssembleTask().train(parse_config(recipe | {"output_dir": str(interrupted)}), resume=True)
    expected = load_file(whole / "model" / "projector.safetensors")
    resumed = load_file(interrupted / "model" / "projector.safetensors")
    assert all(torch.allclose(expected[k], resumed[k], atol=1e-6) for k in expected)


def test_two_ranks_train_the_same_projector(parts, colour_data, tmp_path, write_recipe):
    from tests.conftest import train_two_ranks

    recipe = _recipe(parts, colour_data, tmp_path, "align")
    recipe["train"] |= {"max_steps": 2, "batch_size": 2}
    recipe["eval"] = {"max_samples": 1, "max_new_tokens": 1}
    ranks = train_two_ranks(write_recipe(recipe))
    assert all(r["world_size"] == 2 and r["samples_seen"] == 4 for r in ranks)
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"]


def test_align_reads_coco_captions_and_llava_pretrain_json(parts, colour_data, tmp_path):
    from visiontune.vlm.assemble import is_caption_data, read_stage_data

    root = colour_data["root"]
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in range(3)],
        "annotations": [{"id": i, "image_id": i, "caption": f"a {list(COLOURS)[i]} square"} for i in range(3)],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    pretrain = [
        {
            "id": str(i),
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
                {"from": "gpt", "value": f"a {list(COLOURS)[i]} square"},
            ],
        }
        for i in range(3)
    ]
    (root / "pretrain.json").write_text(json.dumps(pretrain))
    cfg = parse_config(_recipe(parts, colour_data, tmp_path, "align"))
    assert is_caption_data(str(root / "coco.json")) and not is_caption_data(str(root / "pretrain.json"))
    for name in ("coco.json", "pretrain.json"):
        convs = read_stage_data(str(root / name), cfg)
        assert [c.turns[-1].text for c in convs] == ["a red square", "a green square", "a blue square"]
        assert all(c.turns[0].text.startswith("<image>") and len(c.images) == 1 for c in convs)


def test_align_validates_during_training_and_keeps_the_best_checkpoint(parts, colour_data, tmp_path, write_recipe, cli):
    recipe = _recipe(parts, colour_data, tmp_path, train={"eval_steps": 2, "max_steps": 4, "epochs": 1})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("eval_exact_match" in r for r in evals)
    assert json.loads((run / "summary.json").read_text())["best_checkpoint"]
    assert any((run / "tb").rglob("events.out.tfevents.*"))
