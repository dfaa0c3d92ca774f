"""`visiontune ask`: a question about an image, streamed token by token (transformers TextStreamer) to the console, for
a transformers VLM folder and an assembled one; `--data` answers a JSONL batch; bad input is one sentence. The streamed
text is checked against the same greedy generation without a streamer (one process, same inputs: no float-rounding
verdict)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import fixture_seed

QUESTION = "What colour is it?"


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    from visiontune.testing.fixtures import tiny_timm_cnn
    from visiontune.testing.vlm_fixtures import tiny_causal_lm, tiny_vlm
    from visiontune.vlm.assembled import build_assembled

    out = tmp_path_factory.mktemp("ask")
    with fixture_seed():
        idefics = tiny_vlm("idefics3", out / "idefics3")
        model, processor = build_assembled(
            f"timm:local-dir:{tiny_timm_cnn(out / 'cnn')}",
            str(tiny_causal_lm("llama", out / "llama")),
            {"kind": "patch_reducer", "options": {}},
        )
        model.eval().save_pretrained(out / "assembled", processor)
    return {"idefics3": idefics, "assembled": out / "assembled"}


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("kind", ["idefics3", "assembled"])
def test_ask_streams_the_greedy_answer(kind, vlms, picture, cli, monkeypatch):
    from visiontune.vlm import ask

    puts: list[int] = []
    make = ask.console_streamer

    def counting(processor):
        streamer = make(processor)
        put = streamer.put
        streamer.put = lambda value: (puts.append(int(value.numel())), put(value))[1]
        return streamer

    monkeypatch.setattr(ask, "console_streamer", counting)
    code, out, err = cli("ask", vlms[kind], QUESTION, "--image", picture, "--max-new-tokens", "5")
    assert code == 0, err
    model, processor = ask.load_for_ask(str(vlms[kind]))
    expected = ask.answer_image(model, processor, Image.open(picture), QUESTION, max_new_tokens=5)
    assert out.strip() == expected
    assert len(puts) >= 2 and all(n == 1 for n in puts[1:])  # the prompt once, then one token at a time


def test_the_prompt_holds_the_image_and_the_question(vlms, picture):
    from visiontune.vlm import ask

    _, processor = ask.load_for_ask(str(vlms["idefics3"]))
    inputs = ask.prompt_inputs(processor, Image.open(picture), QUESTION)
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert QUESTION in text and "<image>" in text and "pixel_values" in inputs
    assert text.rstrip().endswith("Assistant:")  # the chat template's generation prompt


def test_batch_answers_every_line_into_jsonl(vlms, picture, cli, tmp_path):
    from visiontune.vlm import ask

    data = tmp_path / "questions.jsonl"
    lines = [{"image": picture.name, "question": QUESTION, "id": 1}, {"question": "Say hi."}]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    code, out, err = cli("ask", vlms["idefics3"], "--data", data, "--max-new-tokens", "4")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "questions.answers.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [QUESTION, "Say hi."] and rows[0]["id"] == 1
    model, processor = ask.load_for_ask(str(vlms["idefics3"]))
    assert rows[0]["answer"] == ask.answer_image(model, processor, Image.open(picture), QUESTION, max_new_tokens=4)
    code, _, err = cli("ask", vlms["idefics3"], "--data", data, "--max-new-tokens", "4")  # its own output: replaced
    assert code == 0, err


def test_bad_input_is_one_sentence(vlms, picture, cli, tmp_path, fixtures_dir):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "ok"}\n{"image": "a.png"}\n')
    code, _, err = cli("ask", vlms["idefics3"], "--data", data)
    assert code == 2 and f"{data} line 2" in err and '"question"' in err
    code, _, err = cli("ask", vlms["idefics3"], QUESTION, "--data", data)
    assert code == 2 and "one of the two" in err
    code, _, err = cli("ask", vlms["idefics3"], QUESTION, "--image", tmp_path / "missing.png")
    assert code == 2 and "missing.png" in err and "Traceback" not in err
    code, _, err = cli("ask", fixtures_dir / "timm-vit", QUESTION, "--image", picture)
    assert code == 2 and "not a VLM" in err and "visiontune predict" in err
    (tmp_path / "taken.jsonl").write_text("mine\n")
    code, _, err = cli("ask", vlms["idefics3"], "--data", data, "--out", tmp_path / "taken.jsonl")
    assert code == 2 and (tmp_path / "taken.jsonl").read_text() == "mine\n"  # user data is never replaced


def test_predict_answers_the_prompt_for_each_image(vlms, picture, cli):
    from visiontune.vlm import ask

    code, out, err = cli("predict", vlms["idefics3"], picture, picture, "--prompt", QUESTION)
    assert code == 0, err
    model, processor = ask.load_for_ask(str(vlms["idefics3"]))
    expected = ask.answer_image(model, processor, Image.open(picture), QUESTION, max_new_tokens=64)
    assert out.count(f"{picture}\n  {expected}\n") == 2  # (a random model's text may hold line separators)
