"""Read what a run folder holds. Every input except the folder itself is optional: a missing or unreadable file
becomes None / empty so the report simply leaves that section out."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    sections: list[dict[str, Any]] = field(default_factory=list)  # task-specific extras (eval/sections.json)


def load_run(run_dir: Path) -> RunInputs:
    return RunInputs(
        run_dir=run_dir,
        config=_read_mapping(run_dir / "config.yaml", yaml.safe_load) or {},
        records=_read_jsonl(run_dir / "metrics.jsonl"),
        before=_read_mapping(run_dir / "eval" / "before.json", json.loads),
        after=_read_mapping(run_dir / "eval" / "after.json", json.loads),
        summary=_read_mapping(run_dir / "summary.json", json.loads),
        sections=(_read_mapping(run_dir / "eval" / "sections.json", json.loads) or {}).get("sections", []),
    )


def _read_mapping(path: Path, parse) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        # A report is a best-effort summary; one corrupt file should not hide the rest.
        log.warning("report: skipping unreadable %s (%s)", path, e)
        return None
    return value if isinstance(value, dict) else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # blank line, or the half-written last line of a killed run
        if isinstance(record, dict):
            records.append(record)
    return records


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step. A resumed run re-logs some steps; the later line wins."""
    by_step: dict[int, float] = {}
    for record in records:
        step, value = record.get("step"), record.get(key)
        if is_number(step) and is_number(value) and math.isfinite(value):
            by_step[int(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def scalar_metrics(report: dict[str, Any] | None) -> dict[str, float]:
    metrics = report.get("metrics") if report else None
    return {k: float(v) for k, v in metrics.items() if is_number(v)} if isinstance(metrics, dict) else {}


def nested(mapping: dict[str, Any], dotted: str) -> Any:
    """`nested(cfg, "data.train")` -> cfg["data"]["train"], or None anywhere along the way."""
    value: Any = mapping
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
