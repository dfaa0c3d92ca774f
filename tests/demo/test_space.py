"""`visiontune demo --space DIR`: the folder holds app.py, pinned requirements, the model and Space metadata, and
`python app.py` serves the model with no visiontune importable (a shadow package that refuses to import stands in
for the clean venv); its answer is what `visiontune predict` gives (top probability within 1e-4)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from tests.demo.conftest import wait_for

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


def _run_folder(tmp_path, fixtures_dir, fixture: str):
    from visiontune.classify.resolve import resolve_classifier

    run = tmp_path / "run"
    resolve_classifier(str(fixtures_dir / fixture)).save(run / "model")  # as a classify run saves it
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "classify", "model": str(fixtures_dir / fixture)}))
    return run


def test_space_folder_runs_without_visiontune(cli, fixtures_dir, tmp_path):
    from gradio_client import Client, handle_file

    from visiontune.classify.task import ClassifyTask
    from visiontune.demo.serve import free_port

    run = _run_folder(tmp_path, fixtures_dir, "timm-vit")
    space = tmp_path / "space"
    code, out, err = cli("demo", run, "--space", space)
    assert code == 0, err
    requirements = (space / "requirements.txt").read_text().split()
    assert "gradio==6.31.0" in requirements and any(r.startswith("timm==") for r in requirements)
    meta = yaml.safe_load((space / "README.md").read_text().split("---")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert (space / "model" / "model.safetensors").is_file()

    shadow = tmp_path / "shadow" / "visiontune"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('a Space must not need visiontune')\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "GRADIO_SERVER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=space, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/", process)
        image = tmp_path / "photo.png"
        Image.new("RGB", (50, 34), (30, 160, 60)).save(image)
        answer = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(image)), api_name="/classify"
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    (expected,) = ClassifyTask().predict(str(run), [str(image)], top_k=1)
    top_label, top_prob = expected["top"][0]
    shown = {c["label"]: c["confidence"] for c in answer["confidences"]}
    assert shown[top_label] == pytest.approx(top_prob, abs=1e-4)


@pytest.mark.parametrize("kind", ["hf-vit", "clip"])
def test_other_space_apps_import_no_visiontune_and_answer(kind, fixtures_dir, tmp_path):
    import runpy

    from gradio_client import Client, handle_file

    from visiontune.demo.serve import free_port
    from visiontune.demo.space import write_space

    source = _run_folder(tmp_path, fixtures_dir, kind) if kind == "hf-vit" else fixtures_dir / kind
    space = write_space(str(source), tmp_path / "space")
    tree = ast.parse((space / "app.py").read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name.startswith("visiontune") for name in imported)
    app = runpy.run_path(str(space / "app.py"), run_name="space_app")["demo"]
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        image = tmp_path / "photo.png"
        Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        if kind == "clip":
            answer = client.predict(handle_file(str(image)), "red, blue", api_name="/zero_shot")
            assert {c["label"] for c in answer["confidences"]} == {"red", "blue"}
        else:
            answer = client.predict(handle_file(str(image)), api_name="/classify")
            assert len(answer["confidences"]) == 3
    finally:
        app.close()


def test_space_refuses_what_it_cannot_serve_alone(cli, fixtures_dir, tmp_path):
    code, _, err = cli("demo", fixtures_dir / "detr", "--space", tmp_path / "space")
    assert code == 2 and "serve this one with `visiontune demo`" in err
    code, _, err = cli("demo", fixtures_dir / "timm-vit", "--space", tmp_path / "space2", "--share")
    assert code == 2 and "--space only writes" in err and not (tmp_path / "space2").exists()
