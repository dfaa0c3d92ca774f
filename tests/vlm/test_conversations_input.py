"""Conversation input that used to crash: non-UTF-8 JSON/JSONL (a traceback), raw line separators inside a JSONL
string (a record split in two); and the combined train+val check, which names the first bad records, counts the
rest and writes them all to a report file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.vlm.conversations import check_conversation_splits, check_conversations, read_conversations


@pytest.fixture(autouse=True)
def _reports_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


def _record(answer: str = "A", image: str | None = None) -> dict:
    user = {"role": "user", "content": ("<image>" if image else "") + "Q"}
    return {"messages": [user, {"role": "assistant", "content": answer}], "images": [image] if image else []}


@pytest.mark.parametrize(("name", "line"), [("d.json", 1), ("d.jsonl", 2)])
def test_non_utf8_conversation_file_is_one_sentence(tmp_path, name, line):
    path = tmp_path / name
    records = [_record(), _record("caf\u00e9")]
    text = (
        json.dumps(records, ensure_ascii=False)
        if name.endswith(".json")
        else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))} is not UTF-8 text \(line {line} has the byte 0xe9\)"
    ):
        read_conversations(str(path))


def test_jsonl_with_a_raw_line_separator_in_a_string(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_record("one\u2028two"), ensure_ascii=False) + "\n")
    (conv,) = read_conversations(str(path))
    assert conv.turns[-1].text == "one\u2028two" and conv.ref == f"{path} line 1"


def _file(folder: Path, good: int, bad: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    records = [_record(image="a.png") for _ in range(good)] + [_record(image=f"gone{i}.png") for i in range(bad)]
    path = folder / "d.json"
    path.write_text(json.dumps(records))
    return path


def test_check_conversation_splits_reports_train_and_val_together(tmp_path):
    splits = {
        "train": read_conversations(str(_file(tmp_path / "t", 2, 9))),
        "val": read_conversations(str(_file(tmp_path / "v", 1, 3))),
    }
    with pytest.raises(DataError) as info:
        check_conversation_splits(splits)
    message = str(info.value)
    assert message.startswith(f"12 bad conversation(s) in the train and val data (9 train, 3 val): {tmp_path}")
    assert message.count(" (train) has image ") == 9 and message.count(" (val) has image ") == 1
    match = re.search(r"; \.\.\. and 2 more \(the full list is in (\S+)\); fix or remove them, or set", message)
    assert match and "\n" not in message
    assert len(Path(match.group(1)).read_text().splitlines()) == 12
    kept, bad = check_conversation_splits(splits, "skip")
    assert [len(kept["train"]), len(kept["val"])] == [2, 1] and len(bad) == 12
    assert bad[-1][0] == f"{tmp_path / 'v' / 'd.json'} record 3" and "not found" in bad[-1][1]


def test_check_conversations_alone_names_ten_and_counts_the_rest(tmp_path):
    convs = read_conversations(str(_file(tmp_path, 1, 12)))
    with pytest.raises(DataError) as info:
        check_conversations(convs)
    message = str(info.value)
    assert message.startswith(f"12 bad conversation(s): {tmp_path / 'd.json'} record 1 has image")
    assert message.count("has image") == 10 and "; ... and 2 more (the full list is in " in message
    with pytest.raises(DataError, match=r"^There are no val conversations to check"):
        check_conversation_splits({"train": convs, "val": []})
