"""Caption input that used to crash or read wrong: non-UTF-8 files, a stray quote or an unquoted comma in a CSV,
and the combined train+val check whose error names the first bad pairs, counts the rest and writes them all out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from visiontune.clip.captions import clean_pair_splits, clean_pairs, read_captions
from visiontune.core.errors import DataError


@pytest.fixture(autouse=True)
def _reports_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(path)
    return path


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("c.csv", "image,caption\na.png,un caf\u00e9\n", 2),
        ("c.jsonl", '{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "caf\u00e9"}\n', 2),
        (
            "c.json",
            json.dumps(
                {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "caf\u00e9"}]},
                ensure_ascii=False,
            ),
            1,
        ),
    ],
)
def test_non_utf8_caption_file_is_one_sentence(tmp_path, name, text, line):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))} is not UTF-8 text \(line {line} has the byte 0xe9\)"
    ):
        read_captions(str(path))


def test_stray_quote_and_unquoted_comma_are_named(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('image,caption\na.png,a red square\nb.png,"a dog\nc.png,a cat\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 3 opens a quoted field .* stray quote"):
        read_captions(str(path))
    path.write_text("image,caption\na.png,a dog, running\n")  # the caption would be cut at the comma
    with pytest.raises(DataError, match=r"line 2 has 3 fields but the header has 2; quote a field that holds a comma"):
        read_captions(str(path))
    path.write_text('image,caption\na.png,"a dog, running"\n')
    assert read_captions(str(path)).captions == ["a dog, running"]


def test_jsonl_caption_with_a_line_separator_character_stays_one_record(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"image": "a.png", "caption": "one\u2028two"}, ensure_ascii=False) + "\n")
    assert read_captions(str(path)).captions == ["one\u2028two"]


def _pairs_file(folder: Path, good: int, missing: int) -> Path:
    rows = [{"image": str(_png(folder / f"g{i}.png").name), "caption": f"good {i}"} for i in range(good)]
    rows += [{"image": f"gone{i:02d}.png", "caption": "lost"} for i in range(missing)]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_clean_pair_splits_reports_train_and_val_together(tmp_path):
    splits = {
        "train": read_captions(str(_pairs_file(tmp_path / "train", 3, 8))),
        "val": read_captions(str(_pairs_file(tmp_path / "val", 2, 4))),
    }
    with pytest.raises(DataError) as info:
        clean_pair_splits(splits, "error", 10**8)
    message = str(info.value)
    assert message.startswith("12 bad pair(s) in the train and val data (8 train, 4 val): ")
    assert message.count("(train) image gone") == 8 and message.count("(val) image gone") == 2
    match = re.search(r"; \.\.\. and 2 more \(the full list is in (\S+)\); fix or remove them, or set", message)
    assert match and "\n" not in message
    report = Path(match.group(1)).read_text().splitlines()
    assert len(report) == 12 and report[-1].startswith(f"{tmp_path / 'val' / 'pairs.jsonl'} line 6 (val) image")
    kept, bad = clean_pair_splits(splits, "skip", 10**8)
    assert [len(kept["train"]), len(kept["val"])] == [3, 2] and [b.split for b in bad] == ["train"] * 8 + ["val"] * 4


def test_clean_pairs_alone_keeps_its_single_split_wording(tmp_path):
    pairs = read_captions(str(_pairs_file(tmp_path, 1, 1)))
    with pytest.raises(DataError, match=r"^1 bad train pair\(s\) in \S+pairs.jsonl: \S+ line 2 image gone00.png file"):
        clean_pairs(pairs, "error", 10**8, "train")


def test_a_corrupt_image_under_dataloader_workers_is_one_sample_error(tmp_path):
    """An image broken after the up-front check reaches the user as the same one-sentence SampleError the
    labelled-image datasets raise, naming the pair's record and the image, not a worker traceback."""
    import torch

    from visiontune.clip.captions import CaptionedImages, stack_pixels
    from visiontune.core.errors import SampleError

    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\na.png,a red square\nb.png,another red square\n")
    pairs, _ = clean_pairs(read_captions(str(path)), "error", 10**8, "train")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # replaced while the run goes on
    dataset = CaptionedImages(pairs, lambda image: torch.zeros(3, 8, 8), 10**8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=stack_pixels)
    with pytest.raises(SampleError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith(f"{path} line 3 image b.png cannot be decoded (")
    assert message.endswith("; fix or remove it (data.on_bad_sample=skip drops bad pairs).")
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert isinstance(info.value, DataError) and info.value.__cause__ is None
