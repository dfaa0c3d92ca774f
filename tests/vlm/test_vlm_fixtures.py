"""The tiny VLM fixtures load through the Auto classes, render each family's real chat template, and train/generate
on an image + chat with the image-token count the model expects."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from visiontune.testing.vlm_fixtures import FAMILIES, tiny_vlm, write_all_vlms

# family -> (model class, processor class, image tokens for one 32-px image, text that closes an assistant answer,
#            generation prompt the rendered text ends with)
EXPECTED = {
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor", 4, "<end_of_utterance>\n", "Assistant:"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", 4, "<|im_end|>\n", "<|im_start|>assistant\n"),
    "qwen2_5_vl": (
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor",
        4,
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor", 16, " ", "ASSISTANT:"),
}
IMAGE_TOKEN = {"idefics3": "<image>", "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "llava": "<image>"}
ANSWER = "A red cat."


def _messages() -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
    ]


def _image(size: tuple[int, int] = (32, 32)) -> Image.Image:
    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vlms")
    write_all_vlms(out)
    return out


@pytest.fixture(scope="module")
def loaded(vlm_dir):
    """family -> (model, processor), loaded once through the Auto classes as a user would."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache: dict[str, tuple] = {}

    def load(family: str):
        if family not in cache:
            path = vlm_dir / family
            cache[family] = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
        return cache[family]

    return load


def _image_token_id(model) -> int:
    config = model.config
    return config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_auto_classes_and_ids_come_from_the_tokenizer(family, loaded):
    model, processor = loaded(family)
    model_cls, processor_cls, *_ = EXPECTED[family]
    assert type(model).__name__ == model_cls and type(processor).__name__ == processor_cls
    tok = processor.tokenizer
    assert model.config.get_text_config().vocab_size == len(tok)
    assert _image_token_id(model) == tok.convert_tokens_to_ids(IMAGE_TOKEN[family])
    assert tok.pad_token_id is not None and model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.eos_token_id in model.generation_config.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_the_family_markers(family, loaded):
    _, processor = loaded(family)
    *_, answer_end, generation_prompt = EXPECTED[family]
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    assert "Be brief." in text and text.count(IMAGE_TOKEN[family]) == 1
    assert ANSWER + answer_end in text
    assert text.endswith(generation_prompt)
    if family == "llava":  # Vicuna style: no end-of-turn token at all, the next turn simply follows
        assert f"ASSISTANT: {ANSWER} USER: What colour is it? ASSISTANT:" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_and_generate_on_image_and_chat(family, loaded):
    model, processor = loaded(family)
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_image()], return_tensors="pt")
    input_ids = inputs["input_ids"]
    assert int((input_ids == _image_token_id(model)).sum()) == EXPECTED[family][2]

    model.train()
    loss = model(**inputs, labels=input_ids).loss
    assert math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)

    model.eval()
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, input_ids.shape[1] + 3)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_image_tokens_follow_the_image_size(family, loaded):
    """Qwen resizes to a multiple of 28 px within [56², 112²] pixels: (h/28)*(w/28) tokens; a 112-px image spans
    several 2.5-VL attention windows."""
    model, processor = loaded(family)
    text = processor.apply_chat_template(_messages()[1:2], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_image((112, 112))], return_tensors="pt")
    assert int((inputs["input_ids"] == _image_token_id(model)).sum()) == 16
    with torch.no_grad():
        assert math.isfinite(model(**inputs, labels=inputs["input_ids"]).loss.item())


def test_builds_are_deterministic(vlm_dir, tmp_path):
    again = tiny_vlm("llava", tmp_path / "llava")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (vlm_dir / "llava" / name).read_bytes()


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="qwen2_vl"):
        tiny_vlm("blip", tmp_path)


def test_fixtures_cli_points_every_builtin_recipe_at_its_fixtures(cli, tmp_path, monkeypatch):
    """`visiontune fixtures DIR` covers every built-in recipe's model kinds (the tiny causal LMs included): each
    printed command validates, names only fixtures that exist, and the vlm_assemble one trains from the CLI."""
    from transformers import AutoTokenizer

    from visiontune.recipe import RECIPES_DIR

    out = tmp_path / "fx"
    code, stdout, err = cli("fixtures", out)
    assert code == 0, err
    commands = {
        line.split()[2]: line.split()[3:] for line in stdout.splitlines() if line.strip().startswith("visiontune train")
    }
    assert set(commands) == {path.stem for path in RECIPES_DIR.rglob("*.yaml")}
    for name, overrides in commands.items():
        code, _, err = cli("validate", name, *overrides)
        assert code == 0, (name, err)
        for value in (o.partition("=")[2].removeprefix("timm:local-dir:") for o in overrides):
            assert not value.startswith(str(out)) or Path(value).exists(), (name, value)
    for family in ("llama", "qwen2"):
        assert AutoTokenizer.from_pretrained(out / "lm" / family).chat_template

    monkeypatch.chdir(tmp_path)  # the smoke runs go to runs/smoke/ under the working folder
    code, _, err = cli("train", "mnist-align", *commands["mnist-align"])
    assert code == 0, err
    assert (tmp_path / "runs" / "smoke" / "mnist-align" / "model" / "visiontune.json").is_file()


def test_fixtures_cli_leaves_a_folder_it_did_not_make_alone(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    code, _, err = cli("fixtures", tmp_path)
    assert code == 2 and "left alone" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
