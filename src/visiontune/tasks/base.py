"""The protocol every task implements. The CLI only talks to tasks through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel


class Task(Protocol):
    def train(self, config: BaseModel, overwrite: bool = False, resume: bool = False) -> Path:
        """Run the recipe end to end; return the run folder."""

    def evaluate(self, model: str, data: str, out_dir: Path | None = None, **options: Any) -> dict:
        """Evaluate a run folder or model on a dataset; return metrics (and write predictions to out_dir)."""

    def predict(self, model: str, inputs: list[str], top_k: int = 5) -> list[dict]:
        """Predict on individual inputs."""
