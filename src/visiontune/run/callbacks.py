"""Trainer callbacks: rich progress bar, metrics.jsonl, EMA of weights."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

NOT_SHOWN = ("runtime", "per_second", "model_preparation_time")  # timings, not results


class RichProgress(TrainerCallback):
    """step, loss, lr, images/s and ETA on one line (replaces the tqdm bar; main process only)."""

    def __init__(self, items_per_step: int, unit: str = "img", console: Console | None = None):
        self.items_per_step, self.unit = items_per_step, unit
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        # Strings, not floats: before the first log there is no loss to show (not `nan`).
        self.fields = {"loss": "-", "lr": "-", "ips": "-"}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"loss {{task.fields[loss]}}  lr {{task.fields[lr]}}  {{task.fields[ips]}} {self.unit}/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            # rich redraws from its own thread, 10 times a second by default: ~1 ms of CPU per redraw in a terminal,
            # while a CPU training step takes about a second; twice a second still ticks the clock and the ETA
            refresh_per_second=2,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, **self.fields)
        self.start, self.start_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.start
        self.fields["ips"] = f"{(state.global_step - self.start_step) * self.items_per_step / max(elapsed, 1e-9):.1f}"
        self.progress.update(self.task, completed=state.global_step, **self.fields)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        loss = logs.get("loss", logs.get("train_loss"))  # train_loss: the run's mean, logged once at the end
        if loss is not None:
            self.fields["loss"] = f"{loss:.4f}"
        if "learning_rate" in logs:
            self.fields["lr"] = f"{logs['learning_rate']:.2e}"
        self.progress.update(self.task, **self.fields)
        if "eval_loss" in logs:
            shown = "  ".join(
                f"{k.removeprefix('eval_')} {v:.4f}"
                for k, v in logs.items()
                if k.startswith("eval_") and isinstance(v, float) and not k.endswith(NOT_SHOWN)
            )
            self.progress.console.print(
                f"step {state.global_step} eval  {shown}", markup=False, highlight=False, soft_wrap=True
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """Also called when training is interrupted, so the terminal is left clean for the error message."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class MetricsJsonl(TrainerCallback):
    """Appends every log (train and eval) as one JSON line: {"step", "epoch", ...}. A resumed run first drops the
    rows the interrupted run logged past the checkpoint it resumes from: it logs those steps again, and a file with
    two rows for one step is not the run's record."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step > 0 and self.path.is_file():
            keep_rows_up_to(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite a metrics.jsonl without its rows past `step` (and a torn last line), atomically."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):  # a line torn by the kill
        return float("inf")


class WeightEma(TrainerCallback):
    """Exponential moving average of the weights (timm's ModelEmaV3), compared with the trained weights at the
    end of training; the better of the two on validation is kept."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update(_unwrap(model), step=state.global_step)

    def averaged_state(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.ema.module.state_dict())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
