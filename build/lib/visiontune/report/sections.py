"""Tasks append extra report sections (tables, pictures) to `eval/sections.json`; `write_report` renders them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def add_section(
    run_dir: Path,
    title: str,
    text: str | None = None,
    header: list[str] | None = None,
    rows: list[list[Any]] | None = None,
    image: str | None = None,
) -> None:
    path = run_dir / "eval" / "sections.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {"sections": []}
    data["sections"] = [s for s in data["sections"] if s.get("title") != title]  # re-running replaces
    section: dict[str, Any] = {"title": title}
    if text:
        section["text"] = text
    if header:
        section["table"] = {"header": header, "rows": rows or []}
    if image:
        section["image"] = image
    data["sections"].append(section)
    path.write_text(json.dumps(data, indent=2))
