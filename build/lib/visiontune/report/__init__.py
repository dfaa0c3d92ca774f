"""Run report for a fine-tuning run: plots under run_dir/plots plus report.md and a self-contained report.html.

Light on purpose (no torch import): it only reads the files a run leaves behind, so it can be re-run on any
machine, e.g. `python -c "from visiontune.report import write_report; write_report(Path('runs/x'))"`.
"""

from __future__ import annotations

from pathlib import Path

from visiontune.report._content import build_document
from visiontune.report._inputs import load_run
from visiontune.report._plots import make_plots
from visiontune.report._render import to_html, to_markdown

__all__ = ["write_report"]


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write run_dir/report.md and run_dir/report.html (and run_dir/plots/*.png); return (md path, html path).

    Every input file is optional; sections whose data is missing are left out.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run folder {run_dir} does not exist; pass the output_dir of a training run.")
    run = load_run(run_dir)
    blocks = build_document(run, make_plots(run, run_dir / "plots"))
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text(to_markdown(blocks), encoding="utf-8")
    html_path.write_text(to_html(blocks, run_dir), encoding="utf-8")
    return md_path, html_path
