"""Issue 15 for conversations: answers cut at data.max_length are counted (console + data_report.json), the
tokenisation cache keys images on their content (a replaced image with the same size and mtime is re-tokenised),
and conversations that share an image never straddle train and validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.vlm.conversations import Conversation, Turn, read_conversations, refuse_conversation_leak
from visiontune.vlm.sft import _split
from visiontune.vlm.token_cache import tokenize_cached
from visiontune.vlm.tokenize import tokenize, truncation

LONG_ANSWER = " ".join(["red"] * 40)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    from visiontune.testing.vlm_fixtures import tiny_vlm

    return tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("vlm") / "qwen2_vl")


@pytest.fixture(scope="module")
def processor(vlm):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vlm)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache"


def _records(root: Path, answers: list[str], images: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images = images or [f"{i}.png" for i in range(len(answers))]
    for k, name in enumerate(dict.fromkeys(images)):
        if not (root / name).exists():
            Image.new("RGB", (28, 28), (20 * k, 40, 200)).save(root / name)  # a distinct image each
    records = [
        {
            "messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": a}],
            "images": [image],
        }
        for a, image in zip(answers, images, strict=True)
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def _options(**changes) -> dict:
    options = {"max_length": 64, "max_image_pixels": 1_000_000, "train_on": "assistant", "on_bad_sample": "error"}
    return {**options, "cache": True, **changes}


# ---------------------------------------------------------------------------------------------- truncation


def test_cut_answers_are_counted_and_survive_the_cache(processor, tmp_path):
    convs = read_conversations(str(_records(tmp_path / "d", ["red", LONG_ANSWER, "blue"])))
    whole = tokenize(processor, convs[1], 4096, 1_000_000, "assistant")
    limit = len(whole) - 20
    record = tokenize(processor, convs[1], limit, 1_000_000, "assistant")
    assert record.cut == 20 and 0 < record.lost <= 20
    tokens, _ = tokenize_cached(processor, convs, "m", **_options(max_length=limit))
    cached, _ = tokenize_cached(processor, convs, "m", **_options(max_length=limit))
    assert truncation(cached) == truncation(tokens) == {"records": 1, "answer_tokens_lost": record.lost}


# ---------------------------------------------------------------------------------------- cache by content


def test_a_replaced_image_with_the_same_size_and_mtime_is_tokenised_again(processor, tmp_path):
    """Two BMPs of 32x30 and 48x20 pixels are the same number of bytes but give different image tokens: a cache
    keyed on size + mtime handed the first one's tokens to the second."""
    image = tmp_path / "d" / "x.bmp"
    image.parent.mkdir()
    Image.new("RGB", (32, 30), "red").save(image)
    conv = Conversation([Turn("user", "<image>Colour?"), Turn("assistant", "red")], [image], "rec 0")
    first, _ = tokenize_cached(processor, [conv], "m", **_options(max_length=512))
    stat = image.stat()
    Image.new("RGB", (48, 20), "red").save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    again, _ = tokenize_cached(processor, [conv], "m", **_options(max_length=512))
    fresh = tokenize(processor, conv, 512, 1_000_000, "assistant")
    assert again[0].input_ids == fresh.input_ids != first[0].input_ids


# --------------------------------------------------------------------------------------------- leakage


def test_conversations_sharing_an_image_stay_on_one_side(tmp_path):
    """Four questions about each of six images: a split by record put most images on both sides."""
    images = [f"{i}.png" for i in range(6) for _ in range(4)]
    convs = read_conversations(str(_records(tmp_path / "d", [f"answer {k}" for k in range(24)], images)))
    train, val = _split(convs, 0.34, seed=0)
    assert len(val) == 8 and not {c.images[0] for c in train} & {c.images[0] for c in val}


def test_split_without_shared_images_is_unchanged(tmp_path):
    import torch

    convs = read_conversations(str(_records(tmp_path / "d", [f"answer {k}" for k in range(10)])))
    _, val = _split(convs, 0.3, seed=3)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()[:3]
    assert [c.ref for c in val] == [convs[i].ref for i in sorted(order)]


def test_validation_sharing_an_image_with_train_is_refused(tmp_path):
    train = read_conversations(str(_records(tmp_path / "t", ["red", "green", "blue"])))
    val = read_conversations(str(_records(tmp_path / "v", ["what"], ["copy.png"])))
    (tmp_path / "v" / "copy.png").write_bytes((tmp_path / "t" / "1.png").read_bytes())
    with pytest.raises(DataError, match=r"^1 of 1 validation records have an image or the whole record that is also"):
        refuse_conversation_leak(train, val)


def test_truncation_is_said_and_reported(vlm, processor, write_recipe, cli, tmp_path):
    data = _records(tmp_path / "d", ["red", LONG_ANSWER, "blue", "green", LONG_ANSWER, "red", "blue", "green"])
    convs = read_conversations(str(data))
    limit = len(tokenize(processor, convs[1], 4096, 1_000_000, "assistant")) - 20
    recipe = {
        "task": "vlm_sft",
        "model": str(vlm),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(data), "val_split": 0.25, "max_length": limit},
        "eval": {"max_samples": 1, "max_new_tokens": 2},
        "train": {"max_steps": 1, "batch_size": 2, "logging_steps": 1},
    }
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    cut = report["truncated"]
    assert cut["train"]["records"] + cut["val"]["records"] == 2
    lost = cut["train"]["answer_tokens_lost"] + cut["val"]["answer_tokens_lost"]
    assert lost > 0 and f"data.max_length={limit} cut " in err and "answer token(s)" in err
    assert report["duplicates"] == {"train": 0, "val": 0} and report["data"]["train"] == 6
