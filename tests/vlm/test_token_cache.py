"""The tokenisation cache: keyed on the records themselves and every setting, pickle-free, atomic, tolerant of
broken files, written by one rank, and never hiding bad records from an on_bad_sample=error run."""

import copy
import io
import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.vlm import token_cache
from visiontune.vlm.conversations import Conversation, Turn, read_conversations
from visiontune.vlm.token_cache import tokenize_cached
from visiontune.vlm.tokenize import cache_key, tokenize

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
LONG_PROMPT = "Look closely at every detail here. " * 60  # pushes the answer past max_length: a bad record


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    from visiontune.testing.vlm_fixtures import tiny_vlm

    return tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("vlm") / "qwen2_vl")


@pytest.fixture(scope="module")
def processor(vlm):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vlm)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Nine one-image records, colours repeating, each answer naming its own image (record 8 is bad when asked)."""
    root = tmp_path_factory.mktemp("colours")
    records = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 3):
        Image.new("RGB", (40 + 4 * i, 30), rgb).save(root / f"{i}.png")
        question = LONG_PROMPT if i == 8 else f"What colour is picture {i}?"
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"<image>{question}"},
                    {"role": "assistant", "content": f"{name} {i}"},
                ],
                "images": [f"{i}.png"],
            }
        )
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


@pytest.fixture
def convs(data) -> list[Conversation]:
    return read_conversations(str(data))


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache" / "tokenized"


def _options(**changes) -> dict:
    """tokenize_cached's keyword arguments (what vlm_sft takes from the recipe's `data` section)."""
    options = {"max_length": 64, "max_image_pixels": 1_000_000, "train_on": "assistant", "on_bad_sample": "error"}
    return {**options, "cache": True, **changes}


def _count_tokenize(monkeypatch) -> list[str]:
    calls: list[str] = []

    def counting(processor, conv, *args):
        calls.append(conv.ref)
        return tokenize(processor, conv, *args)

    monkeypatch.setattr(token_cache, "tokenize", counting)
    return calls


def _refuse_tokenize(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("re-tokenised although a valid cache was there")

    monkeypatch.setattr(token_cache, "tokenize", refuse)


def _fresh(processor, convs, d) -> list:
    out = []
    for i, conv in enumerate(convs):
        record = tokenize(processor, conv, d["max_length"], d["max_image_pixels"], d["train_on"])
        record.index = i
        out.append(record)
    return out


# ------------------------------------------------------------------------------------------------ the key


def test_a_cached_run_returns_exactly_what_tokenising_returns(processor, convs, data, cache_home, monkeypatch):
    d = _options()
    first, bad = tokenize_cached(processor, convs[:8], "m", **d)
    assert first == _fresh(processor, convs[:8], d) and bad == []
    assert [p.suffix for p in cache_home.iterdir()] == [".safetensors"]
    _refuse_tokenize(monkeypatch)
    assert tokenize_cached(processor, convs[:8], "m", **d) == (first, [])


def test_another_split_with_the_same_size_and_first_records_misses(processor, convs, data, monkeypatch):
    """The old key (count + first three refs + file stat) paired one split's tokens with another split's records."""
    d = _options()
    tokenize_cached(processor, convs[:6], "m", **d)
    other = convs[:3] + convs[5:8]
    calls = _count_tokenize(monkeypatch)
    tokens, _ = tokenize_cached(processor, other, "m", **d)
    assert tokens == _fresh(processor, other, d) and len(calls) == len(other)


def test_the_same_records_in_another_order_miss(processor, convs, data, monkeypatch):
    d = _options()
    tokenize_cached(processor, convs[:5], "m", **d)
    calls = _count_tokenize(monkeypatch)
    swapped = [*convs[:3], convs[4], convs[3]]
    tokens, _ = tokenize_cached(processor, swapped, "m", **d)
    assert tokens == _fresh(processor, swapped, d) and len(calls) == 5


@pytest.mark.parametrize(
    "change", [{"max_length": 65}, {"max_image_pixels": 999_999}, {"train_on": "all"}, {"on_bad_sample": "skip"}]
)
def test_every_setting_passed_in_reaches_the_key(change, processor, convs, monkeypatch):
    """tokenize_cached takes its settings as plain arguments: each one must still change the cache key."""
    tokenize_cached(processor, convs[:3], "m", **_options())
    calls = _count_tokenize(monkeypatch)
    d = _options(**change)
    tokens, _ = tokenize_cached(processor, convs[:3], "m", **d)
    assert tokens == _fresh(processor, convs[:3], d) and len(calls) == 3


def _conv(image, text: str = "<image>What colour?", role: str = "assistant") -> Conversation:
    return Conversation([Turn("user", text), Turn(role, "red")], [image], "mem record 0")


def _png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


SETTINGS = {"max_length": 64, "max_image_pixels": 4096, "train_on": "assistant", "on_bad_sample": "error"}


def _edit_setting(name: str, value):
    return lambda convs, processor, settings, model: (convs, processor, {**settings, name: value}, model)


def _edit_processor(edit):
    def apply(convs, processor, settings, model):
        processor = copy.deepcopy(processor)
        edit(processor)
        return convs, processor, settings, model

    return apply


def _edit_convs(edit):
    return lambda convs, processor, settings, model: (edit(copy.deepcopy(convs)), processor, settings, model)


def _set_text(convs):
    convs[0].turns[1].text = "green"
    return convs


def _set_role(convs):
    convs[0].turns[0].role = "system"
    return convs


def _set_bytes(convs):
    convs[1].images = [_png((0, 0, 1))]
    return convs


def _set_pil(convs):
    convs[2].images = [Image.new("RGB", (8, 8), (0, 0, 1))]
    return convs


CHANGES = {
    "turn text": _edit_convs(_set_text),
    "turn role": _edit_convs(_set_role),
    "image bytes": _edit_convs(_set_bytes),
    "in-memory image": _edit_convs(_set_pil),
    "record order": _edit_convs(lambda convs: convs[::-1]),
    "one record fewer": _edit_convs(lambda convs: convs[:-1]),
    "max_length": _edit_setting("max_length", 65),
    "max_image_pixels": _edit_setting("max_image_pixels", 4097),
    "train_on": _edit_setting("train_on", "all"),
    "on_bad_sample": _edit_setting("on_bad_sample", "skip"),
    "chat template": _edit_processor(lambda p: setattr(p, "chat_template", p.chat_template + " ")),
    "image token": _edit_processor(lambda p: setattr(p, "image_token", "<|video_pad|>")),
    "image processor": _edit_processor(lambda p: setattr(p.image_processor, "merge_size", 1)),
    "tokenizer vocabulary": _edit_processor(lambda p: p.tokenizer.add_tokens(["<new_token>"])),
    "model": lambda convs, processor, settings, model: (convs, processor, settings, model + "-other"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_key_changes_with_everything_that_changes_the_tokens(change, processor, data):
    convs = [*read_conversations(str(data))[:1], _conv(_png((1, 2, 3))), _conv(Image.new("RGB", (8, 8), (1, 2, 3)))]
    before = cache_key("m", processor, convs, SETTINGS)
    convs, processor, settings, model = CHANGES[change](convs, processor, SETTINGS, "m")
    assert cache_key(model, processor, convs, settings) != before


def test_the_key_follows_an_image_file_rewritten_in_place(processor, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image)
    before = cache_key("m", processor, [_conv(image)], SETTINGS)
    Image.new("RGB", (9, 8), (1, 2, 3)).save(image)
    assert cache_key("m", processor, [_conv(image)], SETTINGS) != before


def test_the_same_records_from_another_file_share_the_cache(processor, data, monkeypatch):
    """The data file's path is not part of the key, and the records keep the refs of the file read now."""
    copy_path = data.with_name("copy.json")
    copy_path.write_text(data.read_text())
    d = _options()
    tokenize_cached(processor, read_conversations(str(data))[:3], "m", **d)
    _refuse_tokenize(monkeypatch)
    tokens, _ = tokenize_cached(processor, read_conversations(str(copy_path))[:3], "m", **d)
    assert [t.ref for t in tokens] == [f"{copy_path} record {i}" for i in range(3)]


# ------------------------------------------------------------------------------------------- the file itself


def test_loading_never_unpickles(processor, convs, data, cache_home, monkeypatch):
    import pickle

    from safetensors import safe_open

    d = _options(on_bad_sample="skip")
    expected = tokenize_cached(processor, convs, "m", **d)
    (path,) = cache_home.iterdir()
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["bad"])[0][0] == 8  # plain JSON metadata next to the tensors

    def refuse(*args, **kwargs):
        raise AssertionError("the cache was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    _refuse_tokenize(monkeypatch)
    assert tokenize_cached(processor, convs, "m", **d) == expected


def test_tensor_extras_round_trip(tmp_path, convs):
    from visiontune.vlm.tokenize import Tokenized

    records = [
        Tokenized([1, 2, 3], [-100, 2, 3], {"mm": [0, 1, 0], "grid": torch.tensor([[1, 2, 2]])}, convs[0].ref, 0),
        Tokenized([4, 5], [4, -100], {"mm": [1, 70_000]}, convs[2].ref, 2),
    ]
    path = tmp_path / "x.safetensors"
    token_cache._save(path, "k", len(convs), records, [(1, "is bad")])
    tokens, bad = token_cache._read(path, "k", convs)
    assert bad == [(1, "is bad")] and [t.extra["mm"] for t in tokens] == [[0, 1, 0], [1, 70_000]]
    assert torch.equal(tokens[0].extra["grid"], records[0].extra["grid"]) and "grid" not in tokens[1].extra
    assert [(t.input_ids, t.labels, t.index, t.ref) for t in tokens] == [
        (r.input_ids, r.labels, r.index, r.ref) for r in records
    ]
    token_cache._save(path, "k", len(convs), [], [(0, "is bad"), (1, "too")])  # nothing fitted
    assert token_cache._read(path, "k", convs) == ([], [(0, "is bad"), (1, "too")])


def test_no_cache_file_when_the_cache_is_off(processor, convs, data, cache_home):
    d = _options(cache=False)
    assert tokenize_cached(processor, convs[:2], "m", **d) == (_fresh(processor, convs[:2], d), [])
    assert not cache_home.exists()


def test_cache_files_are_readable_by_others_as_the_umask_allows(processor, convs, data, cache_home):
    """safetensors creates its files 0600; a cache shared between users (VISIONTUNE_CACHE) must follow the umask."""
    import os

    old = os.umask(0o022)
    try:
        tokenize_cached(processor, convs[:2], "m", **_options())
    finally:
        os.umask(old)
    files = list(cache_home.rglob("*.safetensors"))
    assert files and all(f.stat().st_mode & 0o777 == 0o644 for f in files)


def test_written_under_a_unique_temporary_name_then_renamed(processor, convs, data, cache_home, monkeypatch):
    import os

    moves: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src, dst):
        moves.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    d = _options()
    tokenize_cached(processor, convs[:2], "m", **d)
    moves[0][1].unlink()
    tokenize_cached(processor, convs[:2], "m", **d)  # the same key again: a second writer must not share the name
    (src, dst), (src2, dst2) = moves
    assert dst == dst2 and src != src2 and src.parent == dst.parent == cache_home
    assert [p.name for p in cache_home.iterdir()] == [dst.name]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "header only"])
def test_a_broken_cache_file_is_retokenised_and_replaced(
    damage, processor, convs, data, cache_home, monkeypatch, caplog
):
    d = _options()
    expected = tokenize_cached(processor, convs[:4], "m", **d)
    (path,) = cache_home.iterdir()
    whole = path.read_bytes()
    broken = {
        "garbage": b"\x80\x04not a cache" * 10,
        "truncated": whole[: len(whole) // 2],
        "empty": b"",
        "header only": whole[: 8 + int.from_bytes(whole[:8], "little")],
    }[damage]
    path.write_bytes(broken)
    calls = _count_tokenize(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=token_cache.__name__):
        assert tokenize_cached(processor, convs[:4], "m", **d) == expected
    assert len(calls) == 4 and all(r.exc_info is None for r in caplog.records)  # a one-line warning, no traceback
    _refuse_tokenize(monkeypatch)  # the broken file was overwritten with a good one
    assert tokenize_cached(processor, convs[:4], "m", **d) == expected


# ---------------------------------------------------------------------------------------------------- ranks


def test_other_ranks_wait_for_the_writers_file(processor, convs, data, cache_home, monkeypatch):
    d = _options()
    expected = tokenize_cached(processor, convs[:4], "m", **d)
    (path,) = cache_home.iterdir()
    aside = path.with_name("aside")
    path.rename(aside)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(token_cache, "POLL_SECONDS", 0.05, raising=False)
    _refuse_tokenize(monkeypatch)
    writer = threading.Timer(0.5, aside.rename, args=(path,))  # rank 0 finishing its write
    writer.start()
    try:
        assert tokenize_cached(processor, convs[:4], "m", **d) == expected
    finally:
        writer.cancel()


def test_a_waiting_rank_tokenises_itself_after_the_timeout_and_writes_nothing(
    processor, convs, data, cache_home, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(token_cache, "WAIT_SECONDS", 0.2, raising=False)
    monkeypatch.setattr(token_cache, "POLL_SECONDS", 0.05, raising=False)
    d = _options()
    assert tokenize_cached(processor, convs[:2], "m", **d) == (_fresh(processor, convs[:2], d), [])
    assert not cache_home.exists() or not any(cache_home.iterdir())


def test_the_first_rank_writes(processor, convs, data, cache_home, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    tokenize_cached(processor, convs[:2], "m", **_options())
    assert len(list(cache_home.iterdir())) == 1


# ------------------------------------------------------------------------------------------------ bad records


def test_an_error_run_raises_even_after_a_skip_run_cached_the_bad_record(processor, convs, data):
    tokens, bad = tokenize_cached(processor, convs, "m", **_options(on_bad_sample="skip"))
    assert len(tokens) == 8 and [ref for ref, _ in bad] == [convs[8].ref] and "data.max_length" in bad[0][1]
    with pytest.raises(DataError, match=r"record 8 .*on_bad_sample=skip") as err:
        tokenize_cached(processor, convs, "m", **_options(on_bad_sample="error"))
    assert str(err.value).count(". ") == 0  # one sentence


def test_the_error_is_raised_from_a_cached_bad_list_too(processor, convs, data, monkeypatch):
    """Belt and braces: even a cache that records a bad record for an error run's key makes the run fail."""
    skip = _options(on_bad_sample="skip")
    monkeypatch.setattr(token_cache, "cache_key", lambda model, proc, cs, settings: cache_key(model, proc, cs, {}))
    tokenize_cached(processor, convs, "m", **skip)  # now cached under a key that ignores on_bad_sample
    _refuse_tokenize(monkeypatch)
    with pytest.raises(DataError, match="record 8"):
        tokenize_cached(processor, convs, "m", **_options(on_bad_sample="error"))


def test_a_failed_write_warns_and_training_goes_on(processor, convs, data, cache_home, monkeypatch, caplog):
    def disk_full(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(token_cache, "save_file", disk_full)
    d = _options()
    with caplog.at_level(logging.WARNING, logger=token_cache.__name__):
        assert tokenize_cached(processor, convs[:2], "m", **d) == (_fresh(processor, convs[:2], d), [])
    assert "No space left" in caplog.text and list(cache_home.iterdir()) == []  # the partial file is removed
