"""vlm_sft on tiny fixtures of every family: assistant-only labels (golden spans), end-to-end LoRA / full / QLoRA
runs, image-safe truncation, the tokenisation cache, merged export parity, and compare."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import assert_same_greedy
from visiontune.vlm.conversations import read_conversations
from visiontune.vlm.tokenize import IGNORE, tokenize

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
# What each family's template writes after an assistant answer, and so what must be trained with it.
GOLDEN = {
    "idefics3": [" red<end_of_utterance>\n", " yes red<end_of_utterance>\n"],
    "qwen2_vl": ["red<|im_end|>\n", "yes red<|im_end|>\n"],
    "qwen2_5_vl": ["red<|im_end|>\n", "yes red<|im_end|>\n"],
    "llava": ["red </s>", "yes red </s>"],  # llava-1.5's template has no end-of-turn token: we add eos
}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    from visiontune.testing.vlm_fixtures import write_all_vlms

    return write_all_vlms(tmp_path_factory.mktemp("vlms"))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    """LLaMA-Factory ShareGPT-style records: a system prompt, an image, two question/answer turns."""
    root = tmp_path_factory.mktemp("colours")
    records = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 3):
        Image.new("RGB", (40, 30), rgb).save(root / f"{i}.png")
        records.append(
            {
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "<image>What colour is this?"},
                    {"role": "assistant", "content": name},
                    {"role": "user", "content": "Sure?"},
                    {"role": "assistant", "content": f"yes {name}"},
                ],
                "images": [f"{i}.png"],
            }
        )
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def _spans(tokenizer, record) -> list[str]:
    spans, current = [], []
    for token, label in zip(record.input_ids, record.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("family", list(GOLDEN))
def test_only_assistant_answers_and_their_end_of_turn_are_trained(family, vlms, colour_data):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(vlms[family])
    conv = read_conversations(str(colour_data))[0]
    record = tokenize(processor, conv, 512, 512 * 512, "assistant")
    assert _spans(processor.tokenizer, record) == GOLDEN[family]
    everything = tokenize(processor, conv, 512, 512 * 512, "all")
    assert everything.labels == everything.input_ids


@pytest.fixture
def vlm_recipe(vlms, colour_data, tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))

    def make(family: str = "qwen2_vl", **sections) -> dict:
        config = {
            "task": "vlm_sft",
            "model": str(vlms[family]),
            "output_dir": str(tmp_path / "run"),
            "data": {"train": str(colour_data), "val_split": 0.25, "max_length": 256},
            "eval": {"metrics": ["exact_match", "anls"], "max_new_tokens": 3},
            "train": {"epochs": 1, "batch_size": 2, "logging_steps": 1},
        }
        for key, value in sections.items():
            config.setdefault(key, {}).update(value) if isinstance(value, dict) else config.__setitem__(key, value)
        return config

    return make


@pytest.mark.random_model
@pytest.mark.parametrize(
    "family,method", [("qwen2_vl", "lora"), ("idefics3", "full"), ("llava", "lora"), ("qwen2_5_vl", "lora")]
)
def test_train_eval_export(family, method, vlm_recipe, write_recipe, cli):
    recipe = vlm_recipe(family, tune={"method": method})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    before = json.loads((run / "eval/before.json").read_text())
    after = json.loads((run / "eval/after.json").read_text())
    assert (
        set(after["metrics"]) == {"loss", "exact_match", "anls"} and len(after["samples"]) == len(before["samples"]) > 0
    )
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("padding_fraction" in r for r in logs)
    if method == "full":
        assert (run / "model" / "config.json").is_file()
        return
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = AutoModelForImageTextToText.from_pretrained(recipe["model"])
    adapted = PeftModel.from_pretrained(base, str(run / "adapter")).eval()  # PEFT's own format, plain loading
    code, _, err = cli("export", run, "--merge")
    assert code == 0, err
    merged = AutoModelForImageTextToText.from_pretrained(run / "merged").eval()
    processor = AutoProcessor.from_pretrained(run / "merged")
    conv = read_conversations(recipe["data"]["train"])[0]
    from visiontune.vlm.conversations import load_images, to_messages
    from visiontune.vlm.tokenize import nested_images, render

    images = load_images(conv)
    inputs = processor(
        text=[render(processor, to_messages(conv))],
        return_tensors="pt",
        images=[images] if nested_images(processor) else images,
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, rtol=1e-4, atol=1e-4)
        a = merged.generate(**inputs, max_new_tokens=3, do_sample=False)
        b = adapted.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert_same_greedy(a, b, inputs["input_ids"].shape[1], tol=1e-4 * (1 + float(b.logits[0].abs().max())))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_qlora_trains_on_cpu(family, vlm_recipe, write_recipe, cli):
    pytest.importorskip("bitsandbytes")
    recipe = vlm_recipe(family, tune={"method": "qlora"}, train={"max_steps": 2})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    config = json.loads((Path(recipe["output_dir"]) / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_max_length_too_small_for_an_image_names_the_record(vlm_recipe, write_recipe, cli):
    code, _, err = cli("train", write_recipe(vlm_recipe("llava", data={"max_length": 12})))
    # Which record is named first depends on the split (records showing the same image stay on one side).
    assert code == 2 and " record " in err and "data.max_length" in err and "Traceback" not in err
    code, _, err = cli(
        "train", write_recipe(vlm_recipe("llava", data={"max_length": 12, "on_bad_sample": "skip"})), "--overwrite"
    )
    assert code == 2 and "No record" in err


def test_tokenisation_is_cached_between_runs(vlm_recipe, write_recipe, cli, monkeypatch):
    recipe = write_recipe(vlm_recipe(train={"max_steps": 1}))
    assert cli("train", recipe)[0] == 0

    def refuse(*args, **kwargs):
        raise AssertionError("re-tokenised although the cache was valid")

    monkeypatch.setattr("visiontune.vlm.token_cache.tokenize", refuse)
    code, _, err = cli("train", recipe, "--overwrite")
    assert code == 0, err


def test_missing_chat_template_names_the_recipe_key(vlms, vlm_recipe, write_recipe, cli, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(vlms["qwen2_vl"], bare)
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = cli("train", write_recipe(vlm_recipe(model=str(bare))))
    assert code == 2 and "chat_template" in err


def test_compare_writes_side_by_side_report(vlm_recipe, write_recipe, cli, tmp_path):
    recipe = vlm_recipe(train={"max_steps": 2})
    assert cli("train", write_recipe(recipe))[0] == 0
    code, out, err = cli(
        "compare",
        recipe["model"],
        recipe["output_dir"],
        "--data",
        recipe["data"]["train"],
        "--out",
        tmp_path / "cmp",
        "--max-new-tokens",
        "2",
    )
    assert code == 0, err
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Biggest wins" in text and "Biggest losses" in text and "| exact_match |" in text


def test_two_ranks_train_the_same_adapter(vlm_recipe, write_recipe):
    from tests.conftest import train_two_ranks

    recipe = vlm_recipe(train={"max_steps": 2, "batch_size": 1}, eval={"max_samples": 1})
    ranks = train_two_ranks(write_recipe(recipe))
    assert all(r["world_size"] == 2 and r["samples_seen"] == 2 for r in ranks)
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"]


def test_deepspeed_without_the_package_is_one_sentence(vlm_recipe, write_recipe, cli):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    code, _, err = cli("train", write_recipe(vlm_recipe(train={"deepspeed": "zero2"})))
    assert code == 2 and "pip install deepspeed" in err


def test_validation_during_training_logs_loss_and_generation_metric_and_keeps_best(vlm_recipe, write_recipe, cli):
    recipe = vlm_recipe(train={"eval_steps": 2, "max_steps": 4, "metric": "exact_match"}, track={"tensorboard": True})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    run = Path(recipe["output_dir"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("eval_exact_match" in r and "eval_anls" in r for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_checkpoint"] and "checkpoint-" in summary["best_checkpoint"]
    assert any((run / "tb").rglob("events.out.tfevents.*"))


def test_keys_other_tasks_honour_are_refused_naming_the_task(vlm_recipe, write_recipe, cli):
    code, _, err = cli("validate", write_recipe(vlm_recipe(train={"label_smoothing": 0.1})))
    assert code == 2 and "`train.label_smoothing` is not used by task vlm_sft" in err
