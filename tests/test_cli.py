"""The CLI's edges: every error is one sentence (the traceback only with --debug), the hub probe that keeps a
machine without network from waiting on timeouts, and VLM eval / compare following the bad-record rule."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from visiontune.registry import TASKS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """main() sets these in os.environ; recording them here makes monkeypatch restore them after each test."""
    for name in ("VISIONTUNE_DEBUG", "VISIONTUNE_ERROR_DIR"):
        monkeypatch.setenv(name, "")
    for name in ("HTTPS_PROXY", "https_proxy", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------- errors


def test_unknown_task_lists_the_known_tasks(cli, tmp_path):
    code, _, err = cli("eval", tmp_path, "--data", tmp_path, "--task", "nope")
    line = _one_error_line(err)
    assert code == 2 and "`nope`" in line and all(name in line for name in TASKS)


class _Broken:
    def evaluate(self, *args, **kwargs):
        raise json.JSONDecodeError("Expecting value", "{oops", 0)


def test_an_unexpected_error_is_one_sentence_and_debug_shows_the_traceback(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("visiontune.cli._task", lambda name: _Broken())
    code, _, err = cli("eval", tmp_path, "--data", tmp_path, "--task", "classify")
    line = _one_error_line(err)
    assert code == 2 and "`visiontune eval` failed" in line and "JSON" in line and "--debug" in line

    code, _, err = cli("eval", tmp_path, "--data", tmp_path, "--task", "classify", "--debug")
    assert code == 2 and "Traceback" in err and "JSONDecodeError" in err and "error: " in err

    monkeypatch.setenv("VISIONTUNE_DEBUG", "1")
    code, _, err = cli("eval", tmp_path, "--data", tmp_path, "--task", "classify")
    assert code == 2 and "Traceback" in err


def _conversations(folder: Path, bad: bool = False) -> Path:
    """Two answerable image questions; with bad=True a third whose image file is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "red").save(folder / "red.png")
    record = {
        "messages": [{"role": "user", "content": "<image>What colour is it?"}, {"role": "assistant", "content": "red"}],
        "images": ["red.png"],
    }
    records = [record, record] + ([{**record, "images": ["missing.png"]}] if bad else [])
    (folder / "conversations.json").write_text(json.dumps(records))
    return folder / "conversations.json"


def _run_folder(root: Path, task: str) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"task": task}))
    return root


def test_a_corrupt_visiontune_json_is_named(cli, tmp_path):
    run = _run_folder(tmp_path / "run", "vlm_assemble")
    (run / "model" / "visiontune.json").write_text("{not json")
    code, _, err = cli("eval", run, "--data", _conversations(tmp_path / "data"))
    line = _one_error_line(err)
    assert code == 2 and "visiontune.json is not valid JSON" in line and str(run / "model") in line


def test_a_partial_model_folder_is_one_sentence(cli, tmp_path):
    run = _run_folder(tmp_path / "run", "vlm_sft")
    (run / "model" / "config.json").write_text(json.dumps({"model_type": "llava"}))  # weights never written
    code, _, err = cli("eval", run, "--data", _conversations(tmp_path / "data"))
    line = _one_error_line(err)
    assert code == 2 and f"{run / 'model'} cannot be loaded" in line


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv = ['visiontune', '--help']\n"
        "from visiontune.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--debug" in proc.stdout


# ---------------------------------------------------------------------------------------------------- hub probe


@pytest.fixture
def probe(monkeypatch):
    """Unset HF_HUB_OFFLINE and replace the probe: probe.reachable sets the answer, probe.calls records calls."""

    class Probe:
        reachable = False
        calls: list = []

        def __call__(self, host: str, port: int) -> bool:
            self.calls.append((host, port))
            return self.reachable

    fake = Probe()
    fake.calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("visiontune.cli.hub_reachable", fake)
    return fake


def test_an_unreachable_hub_turns_offline_with_a_note(cli, probe, tmp_path):
    import os

    code, _, err = cli("eval", tmp_path, "--data", tmp_path, "--task", "nope")
    assert probe.calls == [("huggingface.co", 443)]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "note: huggingface.co:443 cannot be reached" in err and "HF_HUB_OFFLINE=1" in err


def test_a_reachable_hub_stays_online(cli, probe, tmp_path):
    import os

    probe.reachable = True
    _, _, err = cli("eval", tmp_path, "--data", tmp_path, "--task", "nope")
    assert len(probe.calls) == 1 and "HF_HUB_OFFLINE" not in os.environ and "note:" not in err


@pytest.mark.parametrize("args", [["recipes"], ["assets"], ["--help"], ["eval", "--help"], ["validate", "nope.yaml"]])
def test_commands_that_never_download_skip_the_probe(cli, probe, args):
    cli(*args)
    assert probe.calls == []


def test_an_offline_variable_skips_the_probe(cli, probe, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cli("eval", tmp_path, "--data", tmp_path, "--task", "nope")
    assert probe.calls == []


def test_the_probe_targets_hf_endpoint_or_the_proxy(monkeypatch):
    from visiontune.cli import hub_address

    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.internal:8080")
    assert hub_address() == ("mirror.internal", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert hub_address() == ("proxy.internal", 3128)


def test_the_probe_is_quick_either_way():
    from visiontune.cli import hub_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub_reachable("127.0.0.1", server.getsockname()[1])
        port = server.getsockname()[1]
    start = time.monotonic()
    assert not hub_reachable("127.0.0.1", port)  # closed now: refused
    assert not hub_reachable("192.0.2.1", 443, seconds=0.5)  # TEST-NET-1, never routed: times out
    assert time.monotonic() - start < 3


# ------------------------------------------------------------------------------------------------ VLM eval / compare


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    from visiontune.testing.vlm_fixtures import tiny_vlm

    return tiny_vlm("idefics3", tmp_path_factory.mktemp("vlm") / "idefics3")


def test_vlm_eval_stops_on_a_bad_record_unless_skip_bad(cli, tiny_vlm_dir, tmp_path):
    data = _conversations(tmp_path / "data", bad=True)
    code, _, err = cli("eval", tiny_vlm_dir, "--data", data, "--task", "vlm_sft")
    line = _one_error_line(err)
    assert code == 2 and f"{data} record 2" in line and "--skip-bad" in line

    out = tmp_path / "eval"
    code, stdout, err = cli("eval", tiny_vlm_dir, "--data", data, "--task", "vlm_sft", "--out", out, "--skip-bad")
    assert code == 0, err
    assert "exact_match" in stdout and f"Left out 1 bad record(s) (--skip-bad); the first: {data} record 2" in err
    report = json.loads((out / "generation.json").read_text())
    assert len(report["samples"]) == 2 and [s["ref"] for s in report["skipped_samples"]] == [f"{data} record 2"]


def test_compare_follows_the_bad_record_rule_and_writes_only_its_own_folder(cli, tiny_vlm_dir, tmp_path):
    data = _conversations(tmp_path / "data", bad=True)
    out = tmp_path / "compare"
    args = ["compare", tiny_vlm_dir, tiny_vlm_dir, "--data", data, "--out", out, "--max-new-tokens", "2"]
    code, _, err = cli(*args)
    assert code == 2 and f"{data} record 2" in _one_error_line(err)

    code, stdout, err = cli(*args, "--skip-bad")
    assert code == 0, err
    assert "Left out 1 bad record(s)" in err and "Report:" in stdout
    result = json.loads((out / "compare.json").read_text())
    assert len(result["samples"]) == 2 and len(result["skipped_samples"]) == 1
    assert "1 bad record(s) left out" in (out / "compare.md").read_text()
    assert cli(*args, "--skip-bad")[0] == 0  # its own earlier output may be replaced

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = cli("compare", tiny_vlm_dir, tiny_vlm_dir, "--data", data, "--out", mine, "--skip-bad")
    assert code == 2 and "left alone" in _one_error_line(err)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------- --out never replaces what it did not write


def _users_results(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    files = {"predictions.csv": "mine\n", "metrics.json": '{"mine": 1}'}
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


def test_eval_out_leaves_a_users_folder_alone(cli, tmp_path):
    mine = tmp_path / "results"
    files = _users_results(mine)
    code, _, err = cli("eval", tmp_path / "model", "--data", tmp_path / "data", "--out", mine)
    assert code == 2 and "left alone" in _one_error_line(err) and "eval --out" in err
    assert {p.name: p.read_text() for p in mine.iterdir()} == files


def test_eval_out_that_is_or_holds_an_input_is_refused(cli, tmp_path):
    data = _conversations(tmp_path / "data").parent
    for out in (data, tmp_path):
        code, _, err = cli("eval", tmp_path / "model", "--data", data, "--out", out, "--task", "vlm_sft")
        line = _one_error_line(err)
        assert code == 2 and "input" in line and str(data) in line, line
    assert sorted(p.name for p in data.iterdir()) == ["conversations.json", "red.png"]


def test_eval_out_may_replace_its_own_earlier_output(cli, tiny_vlm_dir, tmp_path):
    data, out = _conversations(tmp_path / "data"), tmp_path / "eval"
    args = ["eval", tiny_vlm_dir, "--data", data, "--task", "vlm_sft", "--out", out]
    assert cli(*args)[0] == 0
    code, _, err = cli(*args)
    assert code == 0, err


def _chartqa(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "png").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "png" / "c.png")
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"imgname": "c.png", "query": "Q?", "label": "A"}]), encoding="utf-8")
    return data, tmp_path / "png"


def test_convert_out_that_is_its_input_is_refused(cli, tmp_path):
    data, png = _chartqa(tmp_path)
    before = data.read_text()
    code, _, err = cli("convert", "chartqa", data, "--out", data, "--image-root", png)
    assert code == 2 and "input" in _one_error_line(err)
    assert data.read_text() == before


def test_convert_out_over_a_users_file_is_refused_but_its_own_is_rewritten(cli, tmp_path):
    data, png = _chartqa(tmp_path)
    mine = tmp_path / "train.json"
    mine.write_text("[]")
    code, _, err = cli("convert", "chartqa", data, "--out", mine, "--image-root", png)
    assert code == 2 and "left alone" in _one_error_line(err) and mine.read_text() == "[]"
    out = tmp_path / "converted.json"
    for _ in range(2):
        code, _, err = cli("convert", "chartqa", data, "--out", out, "--image-root", png)
        assert code == 0, err


def test_merge_out_that_is_an_input_is_refused_before_loading(cli, tmp_path):
    from visiontune.run.folder import prepare_output_folder

    earlier = prepare_output_folder(tmp_path / "merged", "merge --out")  # a merge's output, now merged again
    (earlier / "model.safetensors").write_bytes(b"w")
    code, _, err = cli("merge", "base", str(earlier), "other", "--out", earlier)
    assert code == 2 and "input" in _one_error_line(err)
    assert (earlier / "model.safetensors").read_bytes() == b"w"
