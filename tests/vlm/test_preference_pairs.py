"""`visiontune pairs`: a VLM's wrong answers to labelled questions become preference pairs that vlm_preference
reads (chosen = the reference, rejected = each distinct wrong answer); the sampling settings reach `generate`."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

import visiontune.vlm.preference_pairs as mining
from visiontune.vlm.conversations import Conversation, Turn, check_conversation_splits
from visiontune.vlm.preference_data import read_preferences


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    from visiontune.testing.vlm_fixtures import tiny_vlm

    return tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("vlm") / "model")


@pytest.fixture
def questions(tmp_path) -> Path:
    records = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))]):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{i}.png")
        question = {"role": "user", "content": "<image>What colour is this image?"}
        records.append({"messages": [question, {"role": "assistant", "content": name}], "images": [f"{i}.png"]})
    (tmp_path / "questions.json").write_text(json.dumps(records))
    return tmp_path / "questions.json"


def test_wrong_answers_become_pairs_that_vlm_preference_reads(vlm, questions, tmp_path, monkeypatch, cli):
    answers = {"red": [" RED", "green", "green ", "", "blue"], "blue": ["blue", "Blue"]}  # the second: no mistake

    def fake(model, processor, prompt, samples, *args):
        colour = "red" if "0.png" in str(prompt.images[0]) else "blue"
        return answers[colour]

    monkeypatch.setattr(mining, "sample_answers", fake)
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = cli("pairs", vlm, "--data", questions, "--out", out)
    assert code == 0, err
    assert "2 pair(s) from 1 of 2 question(s)" in stdout
    pairs = read_preferences(out)
    kept, bad = check_conversation_splits({"train": [p.chosen for p in pairs]}, "error")
    assert not bad and [(p.chosen.turns[-1].text, p.rejected.turns[-1].text) for p in pairs] == [
        ("red", "green"),
        ("red", "blue"),
    ]
    assert pairs[0].chosen.images == [(questions.parent / "0.png").resolve()]
    assert cli("pairs", vlm, "--data", questions, "--out", out)[0] == 0  # its own file: replaced
    (tmp_path / "mine.jsonl").write_text("keep me\n")
    code, _, err = cli("pairs", vlm, "--data", questions, "--out", tmp_path / "mine.jsonl")
    assert code != 0 and "left alone" in err and (tmp_path / "mine.jsonl").read_text() == "keep me\n"
    asked = []
    monkeypatch.setattr(mining, "sample_answers", lambda model, proc, prompt, *a: asked.append(prompt) or ["green"])
    code, stdout, err = cli("pairs", vlm, "--data", questions, "--out", out, "--limit", "1")
    assert code == 0, err
    assert len(asked) == 1 and "from 1 of 1 question(s)" in stdout  # --limit: a sample of the questions


@pytest.mark.parametrize("beams", [False, True])
def test_sampling_settings_reach_generate(vlm, questions, beams, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    from visiontune.vlm.generate import load_trained
    from visiontune.vlm.preference_pairs import _prompt

    seen, real = [], GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if k in ("do_sample", "temperature", "num_beams")})
        seen[-1]["n"] = kwargs["num_return_sequences"]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    model, processor = load_trained(str(vlm))
    conv = Conversation(
        [Turn("user", "<image>What colour?"), Turn("assistant", "red")], [questions.parent / "0.png"], "q"
    )
    prompt, reference = _prompt(conv)
    got = mining.sample_answers(model, processor, prompt, 3, 0.7, beams, 2, 512 * 512)
    assert reference == "red" and len(got) == 3 and all(isinstance(a, str) for a in got)
    expected = {"do_sample": False, "num_beams": 3} if beams else {"do_sample": True, "temperature": 0.7}
    assert seen == [{**expected, "n": 3}]


def test_in_memory_images_are_written_next_to_the_pairs(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    prompt = Conversation([Turn("user", "<image>?")], [buffer.getvalue()], "q")
    paths = mining._image_paths(prompt, tmp_path / "pairs_images", tmp_path, 7)
    assert paths == ["pairs_images/7-0.png"] and Image.open(tmp_path / paths[0]).getpixel((0, 0)) == (1, 2, 3)


def test_temperature_with_beams_is_refused(vlm, questions, tmp_path, cli):
    code, _, err = cli(
        "pairs", vlm, "--data", questions, "--out", tmp_path / "p.jsonl", "--beams", "--temperature", "0.5"
    )
    assert code != 0 and "--temperature is for sampled answers" in err
