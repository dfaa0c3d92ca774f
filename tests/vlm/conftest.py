"""Fixtures several VLM test modules share (a module's own fixture of the same name takes precedence)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory) -> Path:
    """The tiny random Qwen2-VL checkpoint folder (q/k/v with bias, image_grid_thw)."""
    from visiontune.testing.vlm_fixtures import tiny_vlm

    return tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="session")
def assembled_preference_world(tmp_path_factory) -> dict[str, Path]:
    """The vlm_preference tests on an assembled VLM (test_preference_assembled*.py, test_preference_plan.py): a
    vlm_assemble-format model folder (tiny CLIP + mlp2x_gelu + tiny Qwen2) as `init_from` (`run`), colour pairs and
    their questions. Read-only for the tests."""
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import preference_pairs, tiny_clip
    from visiontune.testing.vlm_fixtures import tiny_causal_lm
    from visiontune.vlm.assembled import build_assembled

    root = tmp_path_factory.mktemp("pref-assembled")
    with fixture_seed():
        clip, lm = tiny_clip(root / "clip"), tiny_causal_lm("qwen2", root / "qwen2")
        model, processor = build_assembled(str(clip), str(lm), {"kind": "mlp2x_gelu"})
    model.save_pretrained(root / "instruct" / "model", processor)
    convs = []
    colours = [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))]
    for i, (name, rgb) in enumerate(colours * 4):
        Image.new("RGB", (32, 32), tuple(min(255, c + 3 * i) for c in rgb)).save(root / f"{i}.png")
        question = {"role": "user", "content": "<image>What colour is this image?"}
        convs.append({"messages": [question, {"role": "assistant", "content": name}], "images": [f"{i}.png"]})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in preference_pairs(convs)) + "\n")
    (root / "questions.json").write_text(json.dumps(convs[:3]))
    return {"run": root / "instruct", "pairs": root / "pairs.jsonl", "questions": root / "questions.json"}


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    """Six one-turn conversations naming the colour of a plain 32 px image, in the messages/images JSON shape."""
    root = tmp_path_factory.mktemp("conversations")
    records = []
    for i, (name, rgb) in enumerate([("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))] * 2):
        Image.new("RGB", (32, 32), rgb).save(root / f"{i}.png")
        turns = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": name}]
        records.append({"messages": turns, "images": [f"{i}.png"]})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """Three one-turn records of different lengths and image sizes (so their image token counts differ for
    Qwen2-VL): the packing tests' rows."""
    root = tmp_path_factory.mktemp("packing")
    rows = []
    for i in range(3):
        Image.new("RGB", (64 + 32 * i, 64), (200 * (i % 2), 60, 90)).save(root / f"{i}.png")
        answer = " ".join(["red"] * (1 + 2 * i))
        messages = [{"role": "user", "content": "<image>Which colour?"}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "images": [f"{i}.png"]})
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


def sdpa_model_and_items(family: str, records: Path, folder: Path) -> tuple:
    """(model with SDPA attention in eval mode, its processor, the token lists, the collator items) of the tiny
    `family` checkpoint over `records`: what the packing tests collate padded and packed."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visiontune.testing.vlm_fixtures import tiny_vlm
    from visiontune.vlm.conversations import read_conversations
    from visiontune.vlm.tokenize import tokenize

    path = tiny_vlm(family, folder / family)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    convs = read_conversations(str(records))
    tokens = [tokenize(processor, c, 512, 512 * 512, "assistant") for c in convs]
    items = [
        {"input_ids": t.input_ids, "labels": t.labels, "extra": t.extra, "conv": c}
        for t, c in zip(tokens, convs, strict=True)
    ]
    return model, processor, tokens, items
