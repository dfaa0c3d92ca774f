"""Conversation readers (LLaMA-Factory ShareGPT + dataset_info.json, LLaVA, TRL messages, saved datasets), the
structural and image checks, and the chat-message output. Every file is generated here."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.vlm import conversations as conv_module
from visiontune.vlm.conversations import Conversation, Turn, check_conversations, read_conversations, to_messages


def _png(path: Path, colour=(255, 0, 0), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _turns(conv: Conversation) -> list[tuple[str, str]]:
    return [(t.role, t.text) for t in conv.turns]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


GOOD = {"messages": [_user("<image>What is it?"), _assistant("A red square.")], "images": ["a.png"]}


# ---------------------------------------------------------------- LLaMA-Factory


def _mllm_demo(root: Path) -> Path:
    """The layout of LLaMA-Factory's data/ folder: dataset_info.json, mllm_demo.json, mllm_demo_data/."""
    _png(root / "mllm_demo_data" / "1.png", (255, 0, 0))
    _png(root / "mllm_demo_data" / "2.png", (0, 255, 0))
    _json(
        root / "mllm_demo.json",
        [
            {
                "messages": [
                    _user("<image>Who are they?"),
                    _assistant("Two players."),
                    _user("What are they doing?<image>"),
                    _assistant("Celebrating."),
                ],
                "images": ["mllm_demo_data/1.png", "mllm_demo_data/2.png"],
            },
            {
                "messages": [_user("<image>他是谁？"), _assistant("一名球员。")],
                "images": ["mllm_demo_data/2.png"],
                "sys": "Answer briefly.",
            },
        ],
    )
    return _json(
        root / "dataset_info.json",
        {
            "mllm_demo": {
                "file_name": "mllm_demo.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "images": "images", "system": "sys"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "system_tag": "system",
                },
            },
            "other": {"file_name": "other.json", "formatting": "sharegpt"},
        },
    )


def test_llamafactory_mllm_demo_layout_via_folder_and_info_file(tmp_path):
    info = _mllm_demo(tmp_path / "data")
    for spec in (info.parent, info):
        convs = read_conversations(str(spec), dataset_name="mllm_demo")
        assert len(convs) == 2
        first, second = convs
        assert _turns(first) == [
            ("user", "<image>Who are they?"),
            ("assistant", "Two players."),
            ("user", "What are they doing?<image>"),
            ("assistant", "Celebrating."),
        ]
        demo_data = (tmp_path / "data" / "mllm_demo_data").resolve()
        assert first.images == [demo_data / "1.png", demo_data / "2.png"]
        assert all(p.is_absolute() for p in first.images)
        assert first.ref == f"{tmp_path / 'data' / 'mllm_demo.json'} record 0"
        assert _turns(second)[0] == ("system", "Answer briefly.")  # the mapped system column
        assert second.ref.endswith("mllm_demo.json record 1")
    kept, bad = check_conversations(convs)
    assert len(kept) == 2 and bad == []


def test_llamafactory_registry_needs_a_known_dataset_name(tmp_path):
    info = _mllm_demo(tmp_path)
    with pytest.raises(DataError, match=r"registers 2 datasets \['mllm_demo', 'other'\]; choose one with dataset_name"):
        read_conversations(str(tmp_path))
    with pytest.raises(DataError, match=r"has no dataset entry 'nope'; use one of \['mllm_demo', 'other'\]"):
        read_conversations(str(info), dataset_name="nope")


def test_llamafactory_images_resolve_against_the_info_folder_and_defaults_apply(tmp_path):
    # As in LLaMA-Factory, media paths start from the dataset_info.json folder even when the data sits in a
    # sub-folder; no columns/tags means conversations + from/value + human/gpt.
    _png(tmp_path / "media" / "x.png")
    _json(
        tmp_path / "sub" / "chat.json",
        [
            {
                "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello"}],
                "images": ["media/x.png"],
            }
        ],
    )
    _json(
        tmp_path / "dataset_info.json",
        {"chat": {"file_name": "sub/chat.json", "formatting": "sharegpt", "columns": {"images": "images"}}},
    )
    (conv,) = read_conversations(str(tmp_path))
    assert conv.images == [(tmp_path / "media" / "x.png").resolve()]
    assert _turns(conv) == [("user", "<image>Hi"), ("assistant", "Hello")]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"hf_hub_url": "org/data", "formatting": "sharegpt"}, "loads from hf_hub_url, but training reads local files"),
        ({"file_name": "d.json"}, "has formatting 'alpaca'; visiontune reads LLaMA-Factory's sharegpt"),
        ({"file_name": "d.json", "formatting": "sharegpt", "ranking": True}, "is a preference \\(ranking\\) dataset"),
        (
            {"file_name": "d.json", "formatting": "sharegpt", "columns": {"videos": "videos"}},
            r"maps columns \['videos'\], which visiontune's VLM fine-tuning does not read",
        ),
        (
            {"file_name": "missing.json", "formatting": "sharegpt"},
            "names file_name 'missing.json', which is not a file",
        ),
    ],
)
def test_llamafactory_entries_that_cannot_be_read(tmp_path, entry, message):
    _json(tmp_path / "d.json", [GOOD])
    info = _json(tmp_path / "dataset_info.json", {"d": entry})
    with pytest.raises(DataError, match=f"{re.escape(str(info))} entry 'd' {message}"):
        read_conversations(str(info))


# ---------------------------------------------------------------- ShareGPT, LLaVA, TRL


def test_sharegpt_from_value_multi_turn_with_system_turn(tmp_path):
    _png(tmp_path / "img" / "a.png")
    path = _jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be terse."},
                    {"from": "human", "value": "<image>\nColour?"},
                    {"from": "gpt", "value": "Red."},
                    {"from": "user", "value": "Sure?"},
                    {"from": "assistant", "value": "Yes."},
                ],
                "images": ["img/a.png"],
            },
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        ],
    )
    first, second = read_conversations(str(path))
    assert _turns(first) == [
        ("system", "Be terse."),
        ("user", "<image>\nColour?"),
        ("assistant", "Red."),
        ("user", "Sure?"),
        ("assistant", "Yes."),
    ]
    assert first.images == [(tmp_path / "img" / "a.png").resolve()]
    assert second.images == [] and second.ref == f"{path} line 2"
    assert check_conversations([first, second])[1] == []


def test_system_column_is_prepended_but_a_system_turn_wins(tmp_path):
    path = _json(
        tmp_path / "d.json",
        [
            {"messages": [_user("Q"), _assistant("A")], "system": "From the column."},
            {
                "messages": [{"role": "system", "content": "From the turn."}, _user("Q"), _assistant("A")],
                "system": "From the column.",
            },
        ],
    )
    first, second = read_conversations(str(path))
    assert _turns(first)[0] == ("system", "From the column.")
    assert [t.text for t in second.turns if t.role == "system"] == ["From the turn."]


def test_llava_json_with_one_image_a_list_and_none(tmp_path):
    images = tmp_path / "coco"
    for name in ("1.png", "2.png", "3.png"):
        _png(images / name)
    path = _json(
        tmp_path / "llava" / "llava_v1_5.json",
        [
            {
                "id": "000001",
                "image": "1.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is this?"},
                    {"from": "gpt", "value": "A square."},
                ],
            },
            {
                "id": "000002",
                "image": ["2.png", "3.png"],
                "conversations": [
                    {"from": "human", "value": "<image>\n<image>\nCompare."},
                    {"from": "gpt", "value": "Same."},
                ],
            },
            {
                "id": "text-only",
                "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}],
            },
        ],
    )
    one, two, none = read_conversations(str(path), image_root=str(images))
    assert one.images == [(images / "1.png").resolve()]
    assert two.images == [(images / "2.png").resolve(), (images / "3.png").resolve()]
    assert none.images == [] and _turns(none) == [("user", "Say hi."), ("assistant", "Hi.")]
    assert one.ref == f"{path} record 0 (id 000001)"
    assert len(check_conversations([one, two, none])[0]) == 3
    # Without image_root the paths start from the JSON file's folder, where these images are not.
    default = read_conversations(str(path))[0]
    assert default.images == [(path.parent / "1.png").resolve()]


def test_trl_messages_jsonl_with_part_lists_and_strings(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    path = _jsonl(
        tmp_path / "trl.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": [{"type": "text", "text": "You read charts."}]},
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "Max?"}, {"type": "image"}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": "42"}]},
                    {"role": "user", "content": "Min?"},
                    {"role": "assistant", "content": "7"},
                ],
                "images": ["a.png", "b.png"],
            },
        ],
    )
    (conv,) = read_conversations(str(path))
    assert _turns(conv) == [
        ("system", "You read charts."),
        ("user", "<image>Max?<image>"),
        ("assistant", "42"),
        ("user", "Min?"),
        ("assistant", "7"),
    ]
    assert conv.images == [(tmp_path / "a.png").resolve(), (tmp_path / "b.png").resolve()]
    assert check_conversations([conv])[1] == []


def test_saved_dataset_with_pil_images(tmp_path):
    import datasets

    red, blue = Image.new("RGB", (5, 4), (255, 0, 0)), Image.new("RGB", (3, 3), (0, 0, 255))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    text_only = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    ds = datasets.Dataset.from_dict({"messages": [messages, text_only, messages], "images": [[red], [], [blue]]})
    ds.save_to_disk(str(tmp_path / "ds"))
    convs = read_conversations(str(tmp_path / "ds"))
    assert [_turns(c) for c in convs] == [
        [("user", "<image>Colour?"), ("assistant", "Red.")],
        [("user", "Hi"), ("assistant", "Hello")],
        [("user", "<image>Colour?"), ("assistant", "Red.")],
    ]
    assert isinstance(convs[0].images[0], bytes)  # kept encoded: decoding waits for the batch
    assert Image.open(io.BytesIO(convs[2].images[0])).size == (3, 3)
    assert convs[1].images == [] and convs[2].ref == f"{tmp_path / 'ds'} record 2"
    assert len(check_conversations(convs)[0]) == 3


def test_saved_dataset_dict_split_with_image_paths(tmp_path):
    import datasets

    _png(tmp_path / "pics" / "p.png")
    rows = {"messages": [[_user("<image>Q"), _assistant("A")]], "images": [["pics/p.png"]]}
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"messages": [[_user("Q"), _assistant("A")]], "images": [[]]}),
            "test": datasets.Dataset.from_dict(rows),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    (conv,) = read_conversations(str(tmp_path / "dd"), split="test")
    assert conv.images == [(tmp_path / "pics" / "p.png").resolve()]  # relative to the saved folder's parent


# ---------------------------------------------------------------- to_messages


def test_to_messages_puts_images_where_the_placeholders_were():
    conv = Conversation(
        [
            Turn("system", "Be brief."),
            Turn("user", "Left<image>middle <image>\nright?"),
            Turn("assistant", "Two\nimages."),
            Turn("user", "<image>\nAnd this?"),
            Turn("assistant", "A third."),
        ],
        [b"1", b"2", b"3"],
        "x record 0",
    )
    assert to_messages(conv) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Left"},
                {"type": "image"},
                {"type": "text", "text": "middle"},
                {"type": "image"},
                {"type": "text", "text": "right?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Two\nimages."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A third."}]},
    ]


def test_to_messages_renders_through_a_chat_template():
    """A Qwen2-VL-style template, rendered by transformers' apply_chat_template: vision tokens land in place."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
        "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    )
    conv = Conversation([Turn("user", "What is it?<image>"), Turn("assistant", "Red.")], [b"x"], "x record 0")
    rendered = tokenizer.apply_chat_template(to_messages(conv), tokenize=False)
    assert rendered == (
        "<|im_start|>user\nWhat is it?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
    )


# ---------------------------------------------------------------- bad inputs


BAD_RECORDS = [
    (
        {"messages": GOOD["messages"], "images": ["missing.png"]},
        r"has image \S+missing\.png that is not found \(fix the path or the image root\)",
    ),
    (
        {"messages": [_user("<image><image>Two?"), _assistant("One.")], "images": ["a.png"]},
        r"has 2 <image> placeholder\(s\) but 1 image\(s\) \(put one <image> in the text for each image, in order\)",
    ),
    ({"messages": [_user("Q"), _assistant("A")], "images": ["a.png"]}, r"has 0 <image> placeholder\(s\) but 1 image"),
    ({"messages": [_user("Q"), _assistant("  ")]}, r"has an empty assistant turn 2 \(write the answer or remove"),
    (
        {"messages": [_assistant("A"), _user("Q")]},
        r"has turn 1 from assistant where user should come \(after an optional system turn, user and assistant must "
        "alternate, starting with user\\)",
    ),
    ({"messages": [_user("Q"), _user("Q2"), _assistant("A")]}, r"has turn 2 from user where assistant should come"),
    (
        {"messages": [_user("Q"), {"role": "system", "content": "S"}, _assistant("A")]},
        r"has turn 2 from system where assistant should come",
    ),
    (
        {"messages": [_user("Q"), {"role": "bot", "content": "A"}]},
        r"messages\[1\] has unknown role 'bot' \(use one of \['assistant', 'gpt', 'human', 'system', 'user'\]\)",
    ),
    (
        {"messages": [_user("Q"), {"role": "assistant", "content": 42}]},
        r"messages\[1\] content is a number, not text \(write it as a string or a list of text/image parts\)",
    ),
    ({"messages": [{"role": "user", "content": None}, _assistant("A")]}, r"messages\[0\] content is null, not text"),
    ({"messages": [_user("Q")]}, r"has no assistant turn \(add the answer to train on\)"),
    (
        {"messages": [_user("Q"), _assistant("A"), _user("More?")]},
        r"ends with user turn 3 that has no answer \(add the answer or remove that turn\)",
    ),
    (
        {"messages": [_user("<image>Q"), _assistant("A")], "images": ["https://example.com/cat.jpg"]},
        r"images\[0\] is a URL \(https://example\.com/cat\.jpg\), but images must be local files for offline training "
        r"\(download them and give their paths\)",
    ),
    (
        {"messages": [_user("<image>Q"), _assistant("A")], "images": ["corrupt.png"]},
        r"has image \S+corrupt\.png that is corrupt or not an image .*\(replace or remove it\)",
    ),
    ({"messages": "hello"}, r"has no `messages` list"),
    (["not", "an", "object"], r"is a list, not an object"),
]


@pytest.mark.parametrize(("record", "reason"), BAD_RECORDS)
def test_each_bad_record_is_named_with_its_reason_and_fix(tmp_path, record, reason):
    _png(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = _json(tmp_path / "data.json", [GOOD, record])
    convs = read_conversations(str(path))
    with pytest.raises(
        DataError,
        match=rf"^1 bad conversation\(s\): {re.escape(str(path))} record 1 {reason}.*; fix "
        r"or remove them, or set data.on_bad_sample=skip",
    ):
        check_conversations(convs)
    kept, bad = check_conversations(convs, "skip")
    assert [c.ref for c in kept] == [f"{path} record 0"]
    assert [ref for ref, _ in bad] == [f"{path} record 1"] and re.search(reason, bad[0][1])


def test_registry_tags_are_strict_like_llamafactory(tmp_path):
    _json(tmp_path / "d.json", [{"messages": [{"role": "human", "content": "Q"}, _assistant("A")]}])
    _json(
        tmp_path / "dataset_info.json",
        {
            "d": {
                "file_name": "d.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            }
        },
    )
    with pytest.raises(
        DataError,
        match=r"messages\[0\] has unknown role 'human' \(use one of \['assistant', "
        r"'system', 'user'\]\)",
    ):
        check_conversations(read_conversations(str(tmp_path)))


def test_columns_mapping_naming_a_missing_column_lists_the_columns(tmp_path):
    path = _json(tmp_path / "d.json", [GOOD])
    with pytest.raises(
        DataError,
        match=rf"{re.escape(str(path))} has no column 'dialog' \(mapped as messages\); its "
        r"columns are \['images', 'messages'\], so fix the columns mapping",
    ):
        read_conversations(str(path), columns={"messages": "dialog"})
    _json(
        tmp_path / "dataset_info.json",
        {
            "d": {
                "file_name": "d.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "system": "system"},
            }
        },
    )
    with pytest.raises(DataError, match=r"d\.json has no column 'system' \(mapped as system\)"):
        read_conversations(str(tmp_path))
    with pytest.raises(DataError, match=r"columns has unknown key\(s\) \['image'\]; use only"):
        read_conversations(str(path), columns={"image": "images"})


def test_columns_mapping_renames_every_part(tmp_path):
    _png(tmp_path / "a.png")
    path = _jsonl(
        tmp_path / "d.jsonl", [{"dialog": [_user("<image>Q"), _assistant("A")], "pics": ["a.png"], "prompt": "Sys."}]
    )
    (conv,) = read_conversations(str(path), columns={"messages": "dialog", "images": "pics", "system": "prompt"})
    assert _turns(conv) == [("system", "Sys."), ("user", "<image>Q"), ("assistant", "A")]
    assert conv.images == [(tmp_path / "a.png").resolve()]


@pytest.mark.parametrize(
    ("content", "spec", "message"),
    [
        ("[{", "d.json", r"d\.json is not valid JSON \(.*\); fix the file"),
        ("[]", "d.json", r"d\.json has no records; add conversations to it"),
        ('{"a": 1}\nnot json\n', "d.jsonl", r"d\.jsonl line 2 is not valid JSON \(.*\); fix or remove that line"),
        (
            '[{"text": "x"}]',
            "d.json",
            r"has neither a `messages` nor a `conversations` column \(its columns are "
            r"\['text'\]\); rename one or pass columns",
        ),
        ("x", "d.csv", r"unsupported conversation data; use a \.json/\.jsonl file"),
    ],
)
def test_files_that_cannot_be_read(tmp_path, content, spec, message):
    (tmp_path / spec).write_text(content)
    with pytest.raises(DataError, match=message):
        read_conversations(str(tmp_path / spec))


def test_paths_that_are_not_data(tmp_path):
    with pytest.raises(DataError, match=r"holds neither dataset_info\.json nor a saved dataset"):
        read_conversations(str(tmp_path))
    with pytest.raises(DataError, match=r"does not exist; check the data path"):
        read_conversations(str(tmp_path / "nope.json"))


def test_problem_records_refuse_to_become_messages(tmp_path):
    path = _json(tmp_path / "d.json", [{"messages": [_user("Q"), {"role": "assistant", "content": ["x"]}]}])
    (conv,) = read_conversations(str(path))
    with pytest.raises(DataError, match=r"record 0 messages\[1\] has a part of type None"):
        to_messages(conv)


# ---------------------------------------------------------------- error / skip policy


def test_error_mode_counts_and_lists_the_first_ten(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    records = [GOOD] + [{"messages": [_user(f"Q{i}")]} for i in range(12)]
    _png(tmp_path / "a.png")
    path = _json(tmp_path / "d.json", records)
    with pytest.raises(DataError) as err:
        check_conversations(read_conversations(str(path)))
    message = str(err.value)
    assert message.startswith("12 bad conversation(s)") and f"{path} record 1 has no assistant turn" in message
    assert f"{path} record 10 " in message and f"{path} record 11 " not in message and "... and 2 more" in message


def test_skip_mode_returns_the_bad_refs_and_checks_each_image_once(tmp_path, monkeypatch):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    records = [
        GOOD,
        GOOD,
        {"messages": GOOD["messages"], "images": ["gone.png"]},
        GOOD,
        {"messages": [_user("<image>Q"), _assistant("")], "images": ["b.png"]},
        {"messages": [_user("<image>Q"), _assistant("A")], "images": ["b.png"]},
    ]
    path = _jsonl(tmp_path / "d.jsonl", records)
    checked: list[str] = []
    real_check = conv_module.check_image
    monkeypatch.setattr(conv_module, "check_image", lambda p, m: (checked.append(str(p)), real_check(p, m))[1])
    kept, bad = check_conversations(read_conversations(str(path)), on_bad_sample="skip")
    assert [c.ref for c in kept] == [f"{path} line {n}" for n in (1, 2, 4, 6)]
    assert [ref for ref, _ in bad] == [f"{path} line 3", f"{path} line 5"]
    assert "not found" in bad[0][1] and "empty assistant turn" in bad[1][1]
    assert sorted(checked) == sorted({str((tmp_path / n).resolve()) for n in ("a.png", "b.png", "gone.png")})


def test_pixel_cap_and_all_bad(tmp_path):
    _png(tmp_path / "a.png", size=(40, 40))
    path = _json(tmp_path / "d.json", [GOOD])
    with pytest.raises(
        DataError,
        match=r"Every one of the 1 conversations is bad \(first: .*record 0 has image "
        r"\S+a\.png that is 40x40 = 1,600 pixels, over",
    ):
        check_conversations(read_conversations(str(path)), "skip", max_pixels=1000)


def test_in_memory_images_are_checked(tmp_path):
    good = Conversation([Turn("user", "<image>Q"), Turn("assistant", "A")], [Image.new("RGB", (2, 2))], "m record 0")
    broken = Conversation([Turn("user", "<image>Q"), Turn("assistant", "A")], [b"not an image"], "m record 1")
    kept, bad = check_conversations([good, broken], "skip")
    assert kept == [good] and bad[0][0] == "m record 1" and "cannot be decoded" in bad[0][1]


# ---------------------------------------------------------------- images that break after the check


def test_a_corrupt_image_under_dataloader_workers_is_one_sample_error(tmp_path):
    """The collator decodes images in DataLoader workers: an image broken after the up-front check must reach the
    user as the same one-sentence SampleError the labelled-image datasets raise, naming the record and the file."""
    from types import SimpleNamespace

    import torch

    from visiontune.core.errors import SampleError
    from visiontune.vlm.collate import VlmCollator
    from visiontune.vlm.sft import TokenizedDataset
    from visiontune.vlm.tokenize import Tokenized

    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    path = _json(tmp_path / "data.json", [GOOD, {**GOOD, "images": ["b.png"]}])
    convs, _ = check_conversations(read_conversations(str(path)), "error")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # replaced while the run goes on
    records = [Tokenized([1, 2], [-100, 2], {}, conv.ref, i) for i, conv in enumerate(convs)]
    processor = SimpleNamespace(  # a stand-in: the batch fails before its images reach the image processor
        tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=0),
        image_processor=lambda images, return_tensors: {"pixel_values": torch.zeros(len(images), 3)},
    )
    loader = torch.utils.data.DataLoader(
        TokenizedDataset(records, convs), batch_size=1, num_workers=1, collate_fn=VlmCollator(processor, 10**8)
    )
    with pytest.raises(SampleError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith(f"{path} record 1 has image {tmp_path / 'b.png'} that cannot be decoded (")
    assert message.endswith("; fix or remove it (data.on_bad_sample=skip drops bad conversations).")
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert isinstance(info.value, DataError) and info.value.__cause__ is None
