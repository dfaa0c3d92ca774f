"""Preference pairs as people have them (TRL explicit / implicit prompt, conversational and plain; conversations with
two answers; LLaMA-Factory ranking registrations, ShareGPT and Alpaca) read into the same two conversations, and bad
pairs named in one sentence or skipped and counted."""

import json
from pathlib import Path

import pytest
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.vlm.conversations import check_conversation_splits
from visiontune.vlm.preference_data import read_preferences

Q = "What colour is this?"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name, rgb in (("a.png", (200, 0, 0)), ("b.png", (0, 200, 0))):
        Image.new("RGB", (16, 16), rgb).save(tmp_path / name)
    return tmp_path


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _shape(pair) -> tuple:
    c, r = pair.chosen, pair.rejected
    assert [(t.role, t.text) for t in c.turns[:-1]] == [(t.role, t.text) for t in r.turns[:-1]]
    assert c.images == r.images and c.problem is None, c.problem
    return [(t.role, t.text) for t in c.turns], r.turns[-1].text, [p.name for p in c.images]


EXPECTED = ([("user", f"<image>{Q}"), ("assistant", "red")], "green", ["a.png"])


def test_trl_conversational_explicit_prompt(root):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]
    record = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "green"}]}],
        "images": ["a.png"],
    }
    (pair,) = read_preferences(_jsonl(root / "p.jsonl", [record]))
    assert _shape(pair) == EXPECTED


def test_trl_plain_prompt_gets_its_image_placeholder(root):
    record = {"prompt": Q, "chosen": "red", "rejected": "green", "image": "a.png"}
    (pair,) = read_preferences(_jsonl(root / "p.jsonl", [record]))
    assert _shape(pair) == EXPECTED


def test_trl_implicit_prompt_two_whole_conversations(root):
    user = {"role": "user", "content": f"<image>{Q}"}
    record = {
        "chosen": [user, {"role": "assistant", "content": "red"}],
        "rejected": [user, {"role": "assistant", "content": "green"}],
        "images": ["a.png"],
    }
    (pair,) = read_preferences(_jsonl(root / "p.jsonl", [record]))
    assert _shape(pair) == EXPECTED


def test_conversation_with_two_answers_in_sharegpt_and_messages_style(root):
    sharegpt = {
        "conversations": [{"from": "human", "value": f"<image>{Q}"}],
        "chosen": {"from": "gpt", "value": "red"},
        "rejected": {"from": "gpt", "value": "green"},
        "images": ["a.png"],
    }
    messages = {
        "messages": [{"role": "user", "content": f"<image>{Q}"}],
        "chosen": "red",
        "rejected": "green",
        "images": ["a.png"],
        "system": "Be terse.",
    }
    (root / "p.json").write_text(json.dumps([sharegpt, messages]))
    first, second = read_preferences(root / "p.json")
    assert _shape(first) == EXPECTED
    turns, rejected, images = _shape(second)
    assert turns == [("system", "Be terse."), *EXPECTED[0]] and rejected == "green"


def test_llamafactory_sharegpt_ranking_registration_with_tags(root):
    (root / "data").mkdir()
    record = {
        "msgs": [{"role": "user", "content": f"<image>{Q}"}],
        "good": {"role": "assistant", "content": "red"},
        "bad": {"role": "assistant", "content": "green"},
        "pics": ["a.png"],  # relative to the dataset_info.json folder, as LLaMA-Factory reads them
    }
    (root / "data" / "dpo.json").write_text(json.dumps([record]))
    info = {
        "dpo": {
            "file_name": "data/dpo.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "msgs", "chosen": "good", "rejected": "bad", "images": "pics"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
        "other": {"file_name": "data/dpo.json"},
    }
    (root / "dataset_info.json").write_text(json.dumps(info))
    (pair,) = read_preferences(root, dataset_name="dpo")  # the folder stands for its dataset_info.json
    assert _shape(pair) == EXPECTED
    with pytest.raises(DataError, match=r"entry 'other' is not a preference dataset; mark it"):
        read_preferences(root / "dataset_info.json", dataset_name="other")


def test_llamafactory_alpaca_ranking_with_history(root):
    record = {
        "instruction": Q,
        "input": "",
        "chosen": "red",
        "rejected": "green",
        "images": ["a.png"],
        "history": [["Hi", "Hello"]],
    }
    _jsonl(root / "alpaca.jsonl", [{**record, "instruction": f"<image>{Q}"}])
    info = {"a": {"file_name": "alpaca.jsonl", "ranking": True, "columns": {"images": "images"}}}  # alpaca: default
    (root / "dataset_info.json").write_text(json.dumps(info))
    (pair,) = read_preferences(root / "dataset_info.json")
    turns, rejected, images = _shape(pair)
    assert turns == [("user", "Hi"), ("assistant", "Hello"), *EXPECTED[0]] and (rejected, images) == (
        "green",
        ["a.png"],
    )


def _bad_pairs(root: Path) -> Path:
    good = {"prompt": f"<image>{Q}", "chosen": "red", "rejected": "green", "images": ["a.png"]}
    return _jsonl(
        root / "bad.jsonl",
        [
            good,
            {**good, "rejected": "red "},  # the same answer
            {**good, "rejected": ""},  # an empty answer
            {**good, "images": ["missing.png"]},
            {**good, "prompt": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": "x"}]},
        ],
    )


def test_bad_pairs_are_named_in_one_sentence(root):
    path = _bad_pairs(root)
    pairs = read_preferences(path)
    with pytest.raises(DataError) as err:
        check_conversation_splits({"train": [p.chosen for p in pairs]}, "error")
    text = str(err.value)
    assert text.startswith("4 bad train conversation(s)")  # the first three named, all in a report file
    assert f"{path} line 2 has the same chosen and rejected answer" in text
    assert f"{path} line 3 has an empty rejected answer" in text
    assert "missing.png that is not found" in text
    assert pairs[4].chosen.problem.startswith("has a prompt that does not end with the user's turn")


def test_bad_pairs_are_skipped_and_counted(root):
    pairs = read_preferences(_bad_pairs(root))
    kept, bad = check_conversation_splits({"train": [p.chosen for p in pairs]}, "skip")
    assert kept["train"] == [pairs[0].chosen] and len(bad) == 4


def test_unreadable_files_are_one_sentence(root):
    with pytest.raises(DataError, match="does not exist"):
        read_preferences(root / "nope.jsonl")
    (root / "x.json").write_text('{"a": {"file_name": "f.json", "ranking": true, "hf_hub_url": "x/y"}}')
    with pytest.raises(DataError, match="loads from hf_hub_url"):
        read_preferences(root / "x.json")
    _jsonl(root / "odd.jsonl", [{"question": Q}])
    (pair,) = read_preferences(root / "odd.jsonl")
    assert "has none of prompt / messages / conversations / instruction" in pair.chosen.problem
