"""The report as a list of format-neutral blocks, so report.md and report.html always carry the same content."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune.registry import TASKS, ReportLabels
from visiontune.report._inputs import RunInputs, is_number, nested, scalar_metrics, series

METRIC_ORDER = ["accuracy", "macro_f1", "top5_accuracy", "loss"]
MAX_SKIPPED = 20


@dataclass(frozen=True)
class Code:
    """Inline text shown verbatim (paths, model ids)."""

    text: str


Inline = str | Code


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Facts:
    items: list[tuple[str, Inline]]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Inline]]
    align: str  # one "l"/"r" per column


@dataclass(frozen=True)
class Image:
    alt: str
    path: str  # relative to the run folder


Block = Heading | Paragraph | Facts | Table | Image


def build_document(run: RunInputs, plots: dict[str, Path]) -> list[Block]:
    rel = {name: path.relative_to(run.run_dir).as_posix() for name, path in plots.items()}
    return [
        Heading(f"Run report: {run.run_dir.resolve().name}", level=1),
        *_config_facts(run.config),
        *_run_section(run.summary),
        *_results_section(run),
        *_curves_section(rel),
        *_confusion_section(rel),
        *_per_class_section(run.after),
        *_training_section(run.records),
        *_extra_sections(run),
    ]


def _extra_sections(run: RunInputs) -> list[Block]:
    """Task-specific sections from `eval/sections.json`: [{"title", "text"?, "table"?: {"header", "rows"},
    "image"?: "plots/x.png"}] — how continual matrices, WiSE-FT curves and merges reach the report."""
    blocks: list[Block] = []
    for section in run.sections:
        if not isinstance(section, dict) or not section.get("title"):
            continue
        blocks.append(Heading(str(section["title"])))
        if section.get("text"):
            blocks.append(Paragraph(str(section["text"])))
        table = section.get("table")
        if isinstance(table, dict) and table.get("header"):
            rows = [[fmt(v) for v in row] for row in table.get("rows", [])]
            blocks.append(Table([str(h) for h in table["header"]], rows, "l" + "r" * (len(table["header"]) - 1)))
        image = section.get("image")
        if image and (run.run_dir / image).is_file():
            blocks.append(Image(str(section["title"]), str(image)))
    return blocks


def fmt(value: Any) -> str:
    if is_number(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    return "—" if value is None else str(value)


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"  # json allows NaN/Infinity; a report line is not worth a crash
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _config_facts(config: dict[str, Any]) -> list[Block]:
    wanted = [
        ("Task", "task"),
        ("Model", "model"),
        ("Training data", "data.train"),
        ("Validation data", "data.val"),
        ("Tuning", "tune.method"),
        ("Output", "output_dir"),
    ]
    items: list[tuple[str, Inline]] = [
        (label, Code(str(nested(config, key)))) for label, key in wanted if nested(config, key) is not None
    ]
    return [Facts(items)] if items else []


def _run_section(summary: dict[str, Any] | None) -> list[Block]:
    if not summary:
        return []
    items: list[tuple[str, Inline]] = []
    if is_number(summary.get("wall_time_s")):
        items.append(("Wall time", fmt_duration(summary["wall_time_s"])))
    for label, key in [
        ("Training samples", "train_samples"),
        ("Validation samples", "val_samples"),
        ("Optimizer steps", "global_step"),
    ]:
        if is_number(summary.get(key)):
            items.append((label, str(summary[key])))
    if summary.get("best_checkpoint"):
        items.append(("Best checkpoint", Code(str(summary["best_checkpoint"]))))
    skipped = [s for s in summary.get("skipped_samples") or [] if isinstance(s, dict)]
    items.append(("Skipped samples", str(len(skipped))))
    blocks: list[Block] = [Heading("Run"), Facts(items)]
    if skipped:
        rows: list[list[Inline]] = [
            [Code(str(s.get("ref", "?"))), str(s.get("reason", ""))] for s in skipped[:MAX_SKIPPED]
        ]
        blocks.append(Table(["sample", "reason"], rows, "ll"))
        if len(skipped) > MAX_SKIPPED:
            blocks.append(Paragraph(f"… and {len(skipped) - MAX_SKIPPED} more (see summary.json)."))
    return blocks


def _labels(task: str) -> ReportLabels:
    """The task's report labels from its registry entry (a run of an unknown task gets the plain ones)."""
    spec = TASKS.get(task)
    return spec.report if spec else ReportLabels()


def _results_section(run: RunInputs) -> list[Block]:
    before, after = scalar_metrics(run.before), scalar_metrics(run.after)
    keys = [k for k in METRIC_ORDER if k in before or k in after]
    keys += sorted((before.keys() | after.keys()) - set(keys))
    if not keys:
        return []
    labels = _labels(run.config.get("task", "classify"))
    rows: list[list[Inline]] = []
    for key in keys:
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.4f}" if a is not None and b is not None else "—"
        rows.append([labels.metrics.get(key, key), fmt(b), fmt(a), change])
    blocks: list[Block] = [
        Heading("Results"),
        Paragraph(f"Validation metrics {labels.before_means} and after training."),
        Table(["metric", labels.before, "after", "change"], rows, "lrrr"),
    ]
    weights = run.after.get("weights") if run.after else None
    if weights == "ema":
        blocks.append(Paragraph("Final weights: exponential moving average (scored better than the trained ones)."))
    elif weights:
        blocks.append(Paragraph(f"Final weights: {weights}."))
    return blocks


def _curves_section(rel: dict[str, str]) -> list[Block]:
    images = [
        Image(alt, rel[name]) for name, alt in [("loss", "Loss"), ("metrics", "Validation metrics")] if name in rel
    ]
    return [Heading("Training curves"), *images] if images else []


def _confusion_section(rel: dict[str, str]) -> list[Block]:
    if "confusion_matrix" not in rel:
        return []
    return [
        Heading("Confusion matrix"),
        Paragraph("Rows: true class; columns: predicted class."),
        Image("Confusion matrix", rel["confusion_matrix"]),
    ]


def _per_class_section(after: dict[str, Any] | None) -> list[Block]:
    per_class = after.get("per_class") if after else None
    rows: list[list[Inline]] = [
        [str(c.get("label", "?")), fmt(c.get("precision")), fmt(c.get("recall")), fmt(c.get("support"))]
        for c in per_class or []
        if isinstance(c, dict)
    ]
    if not rows:
        return []
    return [
        Heading("Per-class metrics (after training)"),
        Table(["class", "precision", "recall", "support"], rows, "lrrr"),
    ]


def _training_section(records: list[dict[str, Any]]) -> list[Block]:
    items: list[tuple[str, str]] = []
    steps = [int(r["step"]) for r in records if is_number(r.get("step"))]
    epochs = [float(r["epoch"]) for r in records if is_number(r.get("epoch"))]
    if steps:
        items.append(("Steps", str(max(steps))))
    if epochs:
        items.append(("Epochs", f"{max(epochs):.2f}"))
    final = next((r for r in reversed(records) if "train_runtime" in r or "train_loss" in r), {})
    if is_number(final.get("train_loss")):
        items.append(("Mean training loss", fmt(float(final["train_loss"]))))
    if is_number(final.get("train_runtime")):
        items.append(("Training time", fmt_duration(final["train_runtime"])))
    if is_number(final.get("train_samples_per_second")):
        items.append(("Throughput", f"{final['train_samples_per_second']:.1f} samples/s"))
    _, losses = series(records, "loss")
    if losses:
        items.append(("Last logged training loss", fmt(losses[-1])))
    for key, label in [("eval_accuracy", "Best validation accuracy"), ("eval_macro_f1", "Best validation macro F1")]:
        at, values = series(records, key)
        if values:
            best = max(range(len(values)), key=values.__getitem__)
            items.append((label, f"{values[best]:.4f} (step {at[best]})"))
    return [Heading("Training summary"), Facts(list(items))] if items else []
