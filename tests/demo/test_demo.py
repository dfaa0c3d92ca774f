"""`visiontune demo`: the Gradio page is started on a free local port and called with gradio_client, as a browser's
button would call it; what it answers is what `visiontune predict` answers for the same image (compared in one
process, probabilities within 1e-5): classifiers and dual encoders here, VLMs, detectors and segmenters in
test_demo_pages.py."""

from __future__ import annotations

import shutil
import socket

import pytest
from PIL import Image

from tests.demo.conftest import served

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


def test_classifier_page_answers_what_predict_answers(fixtures_dir, photo, tmp_path):
    from gradio_client import handle_file

    from visiontune.classify.task import ClassifyTask

    run = tmp_path / "run"
    shutil.copytree(fixtures_dir / "timm-vit", run / "model")
    with served(str(run)) as (client, url):
        assert url.startswith("http://127.0.0.1:")
        answer = client.predict(handle_file(str(photo)), api_name="/classify")
    (expected,) = ClassifyTask().predict(str(run), [str(photo)], top_k=3)
    shown = {c["label"]: c["confidence"] for c in answer["confidences"]}
    for label, prob in expected["top"]:
        assert shown[label] == pytest.approx(prob, abs=1e-5)
    assert answer["label"] in shown


def test_clip_page_zero_shot_over_typed_labels_and_search(fixtures_dir, photo, tmp_path):
    from gradio_client import handle_file

    from visiontune.clip.contrastive import ClipContrastiveTask

    blue = tmp_path / "blue.png"
    Image.new("RGB", (40, 40), (20, 20, 220)).save(blue)
    with served(str(fixtures_dir / "clip")) as (client, _):
        answer = client.predict(handle_file(str(photo)), "red, green ,blue", api_name="/zero_shot")
        ranked = client.predict([handle_file(str(photo)), handle_file(str(blue))], "red", api_name="/search")
    (expected,) = ClipContrastiveTask().predict(str(fixtures_dir / "clip"), [str(photo)], 3, ["red", "green", "blue"])
    shown = {c["label"]: c["confidence"] for c in answer["confidences"]}
    assert set(shown) == {"red", "green", "blue"}
    for label, prob in expected["top"]:
        assert shown[label] == pytest.approx(prob, abs=1e-5)
    assert len(ranked) == 2 and all(float(item["caption"]) <= 1.0 for item in ranked)


def test_port_in_use_is_one_sentence(cli, fixtures_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli("demo", fixtures_dir / "timm-vit", "--port", str(port))
    assert code == 2 and f"Port {port} on 127.0.0.1 is in use" in err and "--port" in err
