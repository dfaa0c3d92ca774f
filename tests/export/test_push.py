"""`visiontune push`: one commit of the model folder plus a card that loads from the repo id, through huggingface_hub,
against stand-ins of the Hub (HfApi methods recorded; a local HTTP server that refuses) - never the real Hub."""

from __future__ import annotations

import http.server
import json
import shutil
import threading

import pytest
import yaml


@pytest.fixture
def run(tmp_path, fixtures_dir):
    run = tmp_path / "run"
    shutil.copytree(fixtures_dir / "timm-vit", run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "classify", "model": "timm/vit_tiny_patch16_224"}))
    (run / "eval").mkdir()
    (run / "eval" / "after.json").write_text(json.dumps({"metrics": {"accuracy": 0.75}}))
    return run


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


def test_push_commits_the_model_and_a_hub_card(run, online, monkeypatch, cli):
    from huggingface_hub import HfApi

    calls: dict = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))

    def commit(self, repo_id, operations, **kw):
        calls["commit"] = (repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}, kw, self.token)
        return type("Info", (), {"commit_url": f"https://hub.local/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_commit", commit)
    code, out, err = cli("push", run, "you/vit-tiny", "--private")
    assert code == 0, err
    assert calls["repo"] == ("you/vit-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, files, _, token = calls["commit"]
    assert repo_id == "you/vit-tiny" and token == "hf_test_token"
    model_files = {p.name for p in (run / "model").iterdir()}
    assert set(files) == model_files | {"README.md"}
    card = files["README.md"].decode()
    assert 'timm.create_model("hf-hub:you/vit-tiny"' in card and "value: 0.75" in card
    assert "base_model: timm/vit_tiny_patch16_224" in card
    assert not (run / "model" / "README.md").exists() or "hf-hub:" not in (run / "model" / "README.md").read_text()
    assert "https://hub.local/you/vit-tiny/commit/1" in out


class _Refusing(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args):  # keep the test output clean
        pass


def test_a_refusing_hub_is_one_sentence(run, online, monkeypatch, cli):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        code, _, err = cli("push", run, "you/vit-tiny")
    finally:
        server.shutdown()
    assert code == 2 and "refused the push to you/vit-tiny (HTTP 401" in err and "Traceback" not in err


def test_no_token_or_no_network_is_one_sentence(run, monkeypatch, cli):
    import huggingface_hub
    from huggingface_hub import constants

    code, _, err = cli("push", run, "you/x")  # the tests run offline
    assert code == 2 and "needs a network connection" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, _, err = cli("push", run, "you/x")
    assert code == 2 and "needs a Hugging Face token" in err
    code, out, _ = cli("push", "--help")
    assert "token" in out and "network" in out
