"""What a task is: the few things that are its own. The runner (`visiontune.run.runner`) does the rest.

A task reads and checks its data (`prepare`, before any run folder exists), builds what one training run needs
(`build` -> `Fit`), evaluates with its own metric (`evaluate_run`, before and after training) and saves its
exports (`save`). Evaluating saved models from the command line (`evaluate`, `predict`) is also the task's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel


@dataclass
class Fit:
    """Everything one Trainer run needs that is specific to the task."""

    model: Any
    train_dataset: Any
    eval_dataset: Any | None
    collator: Callable
    compute_metrics: Callable | None = None
    # Builds the optimiser when training starts (model -> optimiser); default: `build_optimizer` over the parameters
    # that require grad. A factory, not an optimiser: Trainer refuses ready optimisers under FSDP.
    make_optimizer: Callable | None = None
    callbacks: list[Any] = field(default_factory=list)
    trainer_class: type | None = None  # default: VisiontuneTrainer
    trainer_attrs: dict[str, Any] = field(default_factory=dict)  # set on the trainer after construction
    args: dict[str, Any] = field(default_factory=dict)  # TrainingArguments the task must set (e.g. drop_last)
    items: str = "img"  # what the progress bar counts per second
    workers: int = 0


@dataclass
class Skipped:
    ref: str
    reason: str


class Task:
    """Base of every task. `train` hands the whole lifecycle to the runner."""

    name = "task"

    def train(self, cfg: BaseModel, overwrite: bool = False, resume: bool = False) -> Path:
        from visiontune.run.runner import run_task

        return run_task(self, cfg, overwrite=overwrite, resume=resume)

    # ---- what each task supplies
    def prepare(self, cfg: BaseModel) -> Any:
        """Read and check the recipe's data (and load what checking needs, e.g. a VLM's processor); raise one
        DataError sentence on bad input. Runs before the run folder exists."""
        raise NotImplementedError

    def skipped(self, data: Any) -> list[Skipped]:
        """Samples left out by `data.on_bad_sample: skip` (default: the `BadSample`s of `data.skipped`, if any)."""
        return [Skipped(b.ref, b.reason) for b in getattr(data, "skipped", None) or []]

    def sizes(self, data: Any) -> dict[str, int]:
        """Counts for summary.json (train_samples, val_samples, ...)."""
        return {}

    def findings(self, data: Any) -> dict[str, Any]:
        """What the data check found besides errors, for data_report.json: duplicates within a split, files left
        out, truncated records, and `data` (the data's fingerprint, which a resume must find unchanged)."""
        return {}

    def build(self, cfg: BaseModel, data: Any, run_dir: Path) -> Fit:
        raise NotImplementedError

    def evaluate_run(self, cfg: BaseModel, fit: Fit, trainer: Any, data: Any, name: str) -> dict:
        """The task's evaluation of the in-training model: {"metrics": {...}, ...} (written to eval/NAME.json)."""
        raise NotImplementedError

    def save(self, cfg: BaseModel, fit: Fit, trainer: Any, data: Any, run_dir: Path, after: dict) -> dict:
        """Write the exports; return extra summary.json fields. Runs on rank 0 only."""
        raise NotImplementedError

    # ---- evaluating saved models (visiontune eval / predict)
    def evaluate(self, model: str, data: str, out_dir: Path | None = None, **options: Any) -> dict:
        raise NotImplementedError

    def predict(self, model: str, inputs: list[str], top_k: int = 5) -> list[dict]:
        from visiontune.core.errors import VisiontuneError

        raise VisiontuneError(f"predict is for classifiers; evaluate a {self.name} model with `visiontune eval`.")
