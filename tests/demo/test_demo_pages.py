"""`visiontune demo` for VLMs (the answer streamed, as `ask` gives it), detectors (boxes) and segmenters (masks),
served on a free local port and called with gradio_client."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.demo.conftest import served

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


def test_vlm_page_streams_the_answer_ask_gives(photo, tmp_path):
    from gradio_client import handle_file

    from tests.conftest import fixture_seed
    from visiontune.testing.vlm_fixtures import tiny_vlm
    from visiontune.vlm import ask

    with fixture_seed():
        folder = tiny_vlm("idefics3", tmp_path / "idefics3")
    model, processor = ask.load_for_ask(str(folder))
    expected = ask.answer_image(model, processor, Image.open(photo), "What colour?", max_new_tokens=6)
    with served(str(folder)) as (client, _):
        job = client.submit(handle_file(str(photo)), "What colour?", 6, api_name="/ask")
        final = job.result()
        updates = job.outputs()
    assert final.strip() == expected
    assert len(updates) >= 2  # streamed: the page got the answer in pieces


def test_detector_and_segmenter_pages(fixtures_dir, photo):
    from gradio_client import handle_file

    from visiontune.detect.task import DetectTask
    from visiontune.segment.task import SegmentTask

    with served(str(fixtures_dir / "detr")) as (client, _):
        boxes = client.predict(handle_file(str(photo)), 0.0, api_name="/detect")
    (expected,) = DetectTask().predict(str(fixtures_dir / "detr"), [str(photo)], conf=0.0)
    shown = [a["label"].rsplit(" ", 1)[0] for a in boxes["annotations"]]
    assert shown == [d["label"] for d in expected["detections"]]
    with served(str(fixtures_dir / "segformer")) as (client, _):
        masks = client.predict(handle_file(str(photo)), api_name="/segment")
    (expected,) = SegmentTask().predict(str(fixtures_dir / "segformer"), [str(photo)], top_k=10)
    assert sorted(a["label"] for a in masks["annotations"]) == sorted(label for label, _ in expected["top"])
