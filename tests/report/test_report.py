"""visiontune.report: plots, report.md and self-contained report.html from a synthetic run folder."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from visiontune.report import write_report

CLASSES = ["cat", "dog", "<b>bird</b>"]
PLOTS = ["loss.png", "metrics.png", "confusion_matrix.png"]


def _eval_report(accuracy: float, macro_f1: float, loss: float, confusion: list[list[int]], **extra) -> dict:
    per_class = [
        {"label": name, "precision": 0.5 + i / 10, "recall": 0.6 + i / 10, "support": sum(confusion[i])}
        for i, name in enumerate(CLASSES)
    ]
    metrics = {"accuracy": accuracy, "macro_f1": macro_f1, "loss": loss}
    return {"metrics": metrics, "per_class": per_class, "confusion_matrix": confusion, "class_names": CLASSES, **extra}


def _metrics_lines() -> list[dict]:
    lines = [{"step": 0, "epoch": 0.0, "before_accuracy": 0.1012, "before_loss": 2.3}]
    for step in range(10, 101, 10):
        lines.append(
            {"step": step, "epoch": step / 50, "loss": 2.0 / step**0.5, "learning_rate": 1e-3, "grad_norm": 1.0}
        )
        if step % 50 == 0:
            lines.append(
                {"step": step, "epoch": step / 50, "eval_loss": 1.0 / step, "eval_accuracy": 0.5 + step / 250,
                 "eval_macro_f1": 0.4 + step / 250, "eval_runtime": 1.2}
            )  # fmt: skip
    lines.append(
        {"step": 100, "epoch": 2.0, "train_runtime": 125.5, "train_loss": 0.42, "train_samples_per_second": 40}
    )
    return lines


def _write_run(run: Path, *, skipped: int = 2) -> Path:
    (run / "eval").mkdir(parents=True)
    config = {"task": "classify", "model": "timm:resnet18", "output_dir": str(run), "data": {"train": "data/pets"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in _metrics_lines()) + "\n")
    before = _eval_report(0.1012, 0.05, 2.31, [[3, 3, 4], [4, 3, 3], [2, 5, 3]])
    after = _eval_report(0.9790, 0.97, 0.08, [[10, 0, 0], [0, 9, 1], [0, 0, 10]], weights="ema")
    (run / "eval" / "before.json").write_text(json.dumps(before))
    (run / "eval" / "after.json").write_text(json.dumps(after))
    summary = {
        "wall_time_s": 130.2, "train_samples": 270, "val_samples": 30, "best_checkpoint": "checkpoints/checkpoint-100",
        "skipped_samples": [{"ref": f"data/pets/bad_{i}.jpg", "reason": "cannot decode"} for i in range(skipped)],
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as img:
        img.verify()
        assert img.format == "PNG" and min(img.size) >= 200


def _embedded_pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)]


def test_full_run_writes_plots_markdown_and_html(tmp_path):
    run = _write_run(tmp_path / "run")
    md_path, html_path = write_report(run)

    assert (md_path, html_path) == (run / "report.md", run / "report.html")
    for name in PLOTS:
        _assert_png(run / "plots" / name)

    md = md_path.read_text()
    assert md.startswith("# Run report: run")
    for fact in ["`classify`", "`timm:resnet18`", "`data/pets`"]:
        assert fact in md
    assert "| accuracy | 0.1012 | 0.9790 | +0.8778 |" in md
    assert "| cross-entropy (no label smoothing) | 2.3100 | 0.0800 | -2.2300 |" in md
    assert md.index("| accuracy") < md.index("| macro_f1") < md.index("| cross-entropy")
    for name in PLOTS:
        assert f"](plots/{name})" in md
    assert "| cat | 0.5000 | 0.6000 | 10 |" in md  # per-class table comes from after.json
    assert r"| \<b\>bird\</b\> | 0.7000 | 0.8000 | 10 |" in md
    assert "exponential moving average" in md
    assert "Wall time:** 2m 10s" in md and "`data/pets/bad_1.jpg`" in md
    assert "Best validation accuracy:** 0.9000 (step 100)" in md
    assert "Mean training loss:** 0.4200" in md

    html_text = html_path.read_text()
    pngs = _embedded_pngs(html_text)
    assert len(pngs) == 3 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert 'src="plots/' not in html_text  # self-contained
    assert "&lt;b&gt;bird&lt;/b&gt;" in html_text and "<b>bird" not in html_text
    assert '<td class="r">+0.8778</td>' in html_text
    assert "<code>timm:resnet18</code>" in html_text


def test_missing_optional_inputs_leave_sections_out(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    md_path, html_path = write_report(run)
    md = md_path.read_text()
    assert md.startswith("# Run report: bare")
    assert "## " not in md and "plots/" not in md
    assert not (run / "plots").exists()
    assert "data:image/png" not in html_path.read_text()


def test_only_after_eval_and_metrics(tmp_path):
    run = _write_run(tmp_path / "run")
    for name in ["config.yaml", "summary.json", "eval/before.json"]:
        (run / name).unlink()
    # A killed run can leave a half-written last line; eval curves may be absent entirely.
    kept = [x for x in _metrics_lines() if "eval_loss" not in x]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in kept) + '\n{"step": 11')

    md = write_report(run)[0].read_text()
    assert "| accuracy | — | 0.9790 | — |" in md
    assert "](plots/loss.png)" in md and "metrics.png" not in md
    assert "## Run\n" not in md and "Training data" not in md
    assert not (run / "plots" / "metrics.png").exists()
    _assert_png(run / "plots" / "confusion_matrix.png")
    assert len(_embedded_pngs(write_report(run)[1].read_text())) == 2


def test_skipped_samples_are_capped_and_bad_files_tolerated(tmp_path):
    run = _write_run(tmp_path / "run", skipped=25)
    (run / "eval" / "before.json").write_text("{not json")
    md = write_report(run)[0].read_text()
    assert "bad_19.jpg" in md and "bad_20.jpg" not in md
    assert "and 5 more" in md and "Skipped samples:** 25" in md
    assert "| accuracy | — | 0.9790 | — |" in md


def test_many_classes_confusion_matrix(tmp_path):
    n = 30
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    after = {"metrics": {"accuracy": 0.5}, "class_names": [f"c{i}" for i in range(n)],
             "confusion_matrix": [[5 if i == j else 1 for j in range(n)] for i in range(n)]}  # fmt: skip
    (run / "eval" / "after.json").write_text(json.dumps(after))
    write_report(run)
    with Image.open(run / "plots" / "confusion_matrix.png") as img:
        assert img.size[0] > 1000  # figure grows with the class count


def test_missing_run_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_report_package_does_not_import_torch(tmp_path):
    run = _write_run(tmp_path / "run")
    code = (
        "import sys; from pathlib import Path; from visiontune.report import write_report; "
        f"write_report(Path({str(run)!r})); assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Image.open(io.BytesIO((run / "plots" / "loss.png").read_bytes())).format == "PNG"
