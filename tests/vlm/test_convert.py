"""`visiontune convert`: CORD and ChartQA inputs (saved datasets, image folders, JSON/JSONL) into conversations that
the VLM readers load back. Every input is generated here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.vlm.conversations import check_conversations, read_conversations
from visiontune.vlm.convert import CONVERTERS, CORD_PROMPT, convert

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
COMPACT = {"ensure_ascii": False, "separators": (",", ":")}
GT = {"menu": [{"nm": "Café latte", "cnt": "1", "price": "4.500"}], "total": {"total_price": "4.500"}}


def _image(colour: tuple[int, int, int], size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _png(path: Path, colour=RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(colour).save(path)
    return path


def _jpeg_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    _image(colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _dataset(path: Path, columns: dict, **features: datasets.features.features.FeatureType) -> Path:
    feature = datasets.Features({name: features.get(name, datasets.Value("string")) for name in columns})
    datasets.Dataset.from_dict(columns, features=feature).save_to_disk(str(path))
    return path


def _cord_dataset(path: Path, truths: list[str]) -> Path:
    images = [_image(c) for c in (RED, GREEN, BLUE)[: len(truths)]]
    return _dataset(path, {"image": images, "ground_truth": truths}, image=datasets.Image())


def _chartqa_dataset(path: Path, rows: list[tuple], label=None) -> Path:
    columns = {"image": [r[0] for r in rows], "query": [r[1] for r in rows], "label": [r[2] for r in rows]}
    return _dataset(path, columns, image=datasets.Image(), label=label or datasets.Sequence(datasets.Value("string")))


def _read_back(out: Path) -> list:
    kept, bad = check_conversations(read_conversations(out), workers=1)
    assert not bad
    return kept


def _turns(conv) -> list[tuple[str, str]]:
    return [(t.role, t.text) for t in conv.turns]


def _colour(source) -> tuple:
    with Image.open(source) as img:
        return img.convert("RGB").getpixel((0, 0))


def _raises(match: str, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        convert(*args, **kwargs)
    message = str(err.value)
    assert match in message, message
    return message


# ---------------------------------------------------------------- cord


def test_cord_saved_dataset(tmp_path):
    truth = json.dumps({"gt_parse": GT, "meta": {"version": "2.0.0"}, "valid_line": []})
    data = _cord_dataset(tmp_path / "cord", [truth, json.dumps({"gt_parse": {"total": {"total_price": "1"}}})])
    out = tmp_path / "out" / "cord.json"
    assert convert("cord", data, out) == 2
    convs = _read_back(out)
    compact = '{"menu":[{"nm":"Café latte","cnt":"1","price":"4.500"}],"total":{"total_price":"4.500"}}'
    assert _turns(convs[0]) == [("user", "<image>" + CORD_PROMPT), ("assistant", compact)]
    assert json.loads(convs[1].turns[1].text) == {"total": {"total_price": "1"}}
    raw = json.loads(out.read_text(encoding="utf-8"))
    assert all(r["images"][0].startswith("images/") and r["images"][0].endswith(".png") for r in raw)
    assert [_colour(c.images[0]) for c in convs] == [RED, GREEN]
    assert all(c.images[0].parent == out.parent / "images" for c in convs)


def test_cord_image_folder(tmp_path):
    folder = tmp_path / "receipts"
    _png(folder / "a.png", RED)
    (folder / "a.json").write_text(json.dumps({"gt_parse": GT, "meta": {}}), encoding="utf-8")
    _image(GREEN).save(folder / "b.jpg")
    (folder / "b.json").write_text(json.dumps({"total": {"total_price": "2"}}), encoding="utf-8")  # no gt_parse
    out = tmp_path / "out" / "cord.json"
    assert convert("cord", folder, out, prompt="Read the receipt.") == 2
    convs = _read_back(out)
    assert _turns(convs[0]) == [("user", "<image>Read the receipt."), ("assistant", json.dumps(GT, **COMPACT))]
    assert convs[1].turns[1].text == '{"total":{"total_price":"2"}}'
    assert [c.images[0] for c in convs] == [(folder / "a.png").resolve(), (folder / "b.jpg").resolve()]
    assert [r["images"] for r in json.loads(out.read_text())] == [["../receipts/a.png"], ["../receipts/b.jpg"]]


def test_cord_bad_ground_truth_in_dataset(tmp_path):
    data = _cord_dataset(tmp_path / "cord", [json.dumps({"gt_parse": GT}), '{"gt_parse": {"menu": '])
    message = _raises("record 1 has ground truth that is not valid JSON", "cord", data, tmp_path / "o.json")
    assert str(data) in message


def test_cord_empty_gt_parse(tmp_path):
    data = _cord_dataset(tmp_path / "cord", [json.dumps({"gt_parse": {}})])
    _raises("record 0 has an empty gt_parse", "cord", data, tmp_path / "o.json")


def test_cord_bad_json_file_in_folder(tmp_path):
    _png(tmp_path / "r" / "a.png")
    (tmp_path / "r" / "a.json").write_text("{not json", encoding="utf-8")
    _raises(
        f"{tmp_path / 'r' / 'a.json'} has ground truth that is not valid JSON",
        "cord",
        tmp_path / "r",
        tmp_path / "o.json",
    )


def test_cord_folder_unpaired_files(tmp_path):
    _png(tmp_path / "r" / "a.png")
    (tmp_path / "r" / "b.json").write_text(json.dumps({"gt_parse": GT}), encoding="utf-8")
    _raises("b.json has no image b.png or b.jpg next to it", "cord", tmp_path / "r", tmp_path / "o.json")
    (tmp_path / "r" / "a.json").write_text(json.dumps({"gt_parse": GT}), encoding="utf-8")
    _png(tmp_path / "r" / "b.png")
    _png(tmp_path / "r" / "c.png")
    _raises("c.png has no ground truth c.json next to it", "cord", tmp_path / "r", tmp_path / "o.json")


def test_cord_missing_columns_listed(tmp_path):
    data = _dataset(tmp_path / "d", {"image": [_image(RED)], "text": ["x"]}, image=datasets.Image())
    _raises("has no column(s) ['ground_truth'] (its columns are ['image', 'text'])", "cord", data, tmp_path / "o.json")


# ---------------------------------------------------------------- chartqa


def test_chartqa_saved_dataset_keeps_questions_apart(tmp_path):
    chart = _image(BLUE)
    rows = [(chart, "What is the peak?", ["42", "forty-two"]), (chart, "Which year?", ["2019"])]
    data = _chartqa_dataset(tmp_path / "chartqa", [*rows, (_jpeg_bytes(GREEN), "Colour?", ["green"])])
    out = tmp_path / "chartqa.json"
    assert convert("chartqa", data, out) == 3
    convs = _read_back(out)
    assert [_turns(c) for c in convs] == [
        [("user", "<image>What is the peak?"), ("assistant", "42")],
        [("user", "<image>Which year?"), ("assistant", "2019")],
        [("user", "<image>Colour?"), ("assistant", "green")],
    ]
    assert convs[0].images == convs[1].images != convs[2].images  # one file per distinct chart
    assert len(list((tmp_path / "images").iterdir())) == 2
    assert _colour(convs[0].images[0]) == BLUE


def test_chartqa_string_label_column(tmp_path):
    data = _chartqa_dataset(tmp_path / "c", [(_image(RED), "Max?", "7")], label=datasets.Value("string"))
    assert convert("chartqa", data, tmp_path / "o.json", prompt="Answer briefly. {query}") == 1
    assert _turns(_read_back(tmp_path / "o.json")[0]) == [("user", "<image>Answer briefly. Max?"), ("assistant", "7")]


def test_chartqa_json_with_image_root(tmp_path):
    _png(tmp_path / "ChartQA" / "train" / "png" / "c1.png", RED)
    records = [{"imgname": "c1.png", "query": "Highest bar?", "label": "A"}, {"imgname": "c1.png", "query": "Sum?"}]
    records[1]["label"] = 12.5  # ChartQA answers are sometimes numbers
    data = tmp_path / "ChartQA" / "train" / "train_augmented.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out" / "chartqa.json"
    assert convert("chartqa", data, out, image_root=tmp_path / "ChartQA" / "train" / "png") == 2
    convs = _read_back(out)
    assert [_turns(c)[1] for c in convs] == [("assistant", "A"), ("assistant", "12.5")]
    assert json.loads(out.read_text())[0]["images"] == ["../ChartQA/train/png/c1.png"]


def test_chartqa_jsonl_relative_to_file(tmp_path):
    _png(tmp_path / "charts" / "c.png", GREEN)
    lines = [{"image": "charts/c.png", "query": "Trend?", "label": ["up"]}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n", encoding="utf-8")
    assert convert("chartqa", tmp_path / "qa.jsonl", tmp_path / "qa.json") == 1
    conv = _read_back(tmp_path / "qa.json")[0]
    assert _turns(conv) == [("user", "<image>Trend?"), ("assistant", "up")]
    assert conv.images == [(tmp_path / "charts" / "c.png").resolve()]


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"imgname": "missing.png", "query": "Q?", "label": "A"}, "record 1 names image"),
        ({"imgname": "c.png", "query": " ", "label": "A"}, "record 1 has an empty or missing query"),
        ({"imgname": "c.png", "label": "A"}, "record 1 has an empty or missing query"),
        ({"imgname": "c.png", "query": "Q?", "label": ""}, "record 1 has an empty or missing label"),
        ({"imgname": "c.png", "query": "Q?", "label": []}, "record 1 has an empty or missing label"),
        ({"query": "Q?", "label": "A"}, "record 1 has no imgname or image"),
        ({"imgname": "c.png", "query": "<image> Q?", "label": "A"}, "record 1 has <image> in its text"),
    ],
)
def test_chartqa_bad_records(tmp_path, record, match):
    _png(tmp_path / "c.png")
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"imgname": "c.png", "query": "Q?", "label": "A"}, record]), encoding="utf-8")
    message = _raises(match, "chartqa", data, tmp_path / "out.json")
    assert str(data) in message
    if "names image" in match:
        assert "missing.png, which does not exist; fix the path or pass --image-root" in message


def test_chartqa_dataset_bad_rows(tmp_path):
    data = _chartqa_dataset(tmp_path / "c", [(_image(RED), "Q?", ["a"]), (_image(RED), "Q2?", [])])
    _raises(f"{data} record 1 has an empty or missing label", "chartqa", data, tmp_path / "o.json")
    data = _dataset(tmp_path / "d", {"image": [_image(RED)], "question": ["Q?"]}, image=datasets.Image())
    _raises(
        "no column(s) ['query', 'label'] (its columns are ['image', 'question'])", "chartqa", data, tmp_path / "o.json"
    )


def test_chartqa_unparsable_jsonl(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"imgname": "c.png"\n', encoding="utf-8")
    _raises(f"{tmp_path / 'qa.jsonl'} line 1 is not valid JSON", "chartqa", tmp_path / "qa.jsonl", tmp_path / "o.json")


# ---------------------------------------------------------------- arguments


def test_bad_arguments(tmp_path):
    _png(tmp_path / "c.png")
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"imgname": "c.png", "query": "Q?", "label": "A"}]), encoding="utf-8")
    _raises("Unknown dataset kind 'docvqa'; use one of ['chartqa', 'cord']", "docvqa", data, tmp_path / "o.json")
    _raises("does not end in .json", "chartqa", data, tmp_path / "o.jsonl")
    _raises("does not exist", "chartqa", tmp_path / "nope.json", tmp_path / "o.json")
    _raises("has no {query}", "chartqa", data, tmp_path / "o.json", prompt="Answer.")
    _raises("has several <image> placeholders", "cord", data, tmp_path / "o.json", prompt="<image><image>")
    _raises("is a file, but cord reads", "cord", data, tmp_path / "o.json")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"query": ["q"]})})
    splits.save_to_disk(str(tmp_path / "splits"))
    hint = f"convert one split at a time by pointing at its folder, e.g. {tmp_path / 'splits' / 'train'}"
    _raises(hint, "chartqa", tmp_path / "splits", tmp_path / "o.json")
    assert sorted(CONVERTERS) == ["chartqa", "cord"]


# ---------------------------------------------------------------- CLI


def test_cli_convert(cli, tmp_path):
    _png(tmp_path / "png" / "c.png")
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"imgname": "c.png", "query": "Q?", "label": "A"}] * 2), encoding="utf-8")
    out = tmp_path / "out.json"
    code, stdout, _ = cli("convert", "chartqa", data, "--out", out, "--image-root", tmp_path / "png")
    assert code == 0 and f"Wrote 2 chartqa conversation records to {out}" in stdout
    assert len(_read_back(out)) == 2
    code, _, stderr = cli("convert", "chartqa", data, "--out", out)
    assert code == 2 and "error:" in stderr and "record 0 names image" in stderr
