"""Runner stages: one run folder in which a task trains several times (a task sequence, align -> instruct, ...).

Every stage keeps the runner's promises: the launch and data checks run before the run folder exists, --overwrite
removes the previous run's files only once the shared model has loaded, each stage
trains with the runner's own Trainer (`make_trainer`: validation, best checkpoint, early stopping, EMA, tracking)
in `stages/I-NAME/`, a finished stage is recorded in `stages/progress.json`, and `--resume` refuses a changed
recipe, reloads finished stages and resumes the interrupted one from its last checkpoint. summary.json and the
report are written once, at the end. A task supplies only what is its own (`StagedTask` below).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visiontune.run.distributed import check_launch_environment, is_main_process
from visiontune.run.folder import last_checkpoint, resume_wanted
from visiontune.run.runner import (
    check_resume_data,
    check_resume_matches,
    keep_better_ema,
    make_trainer,
    open_run,
    rng_preserved,
    save_eval,
    seed_build,
    train_with_progress,
    write_data_report,
    write_summary,
)
from visiontune.run.task import Fit, Task

STAGES = "stages"
PROGRESS = "progress.json"


class StagedTask(Task):
    """A task that trains once per stage, in order, on state it builds once (e.g. one model, several heads)."""

    def train(self, cfg: BaseModel, overwrite: bool = False, resume: bool = False) -> Path:
        return run_stages(self, cfg, overwrite=overwrite, resume=resume)

    # ---- what each staged task supplies (plus prepare / skipped / sizes from Task)
    def stage_names(self, cfg: BaseModel) -> list[str]:
        raise NotImplementedError

    def start(self, cfg: BaseModel, data: Any) -> Any:
        """What every stage shares (the model), built once after the run folder exists."""
        raise NotImplementedError

    def build_stage(self, cfg: BaseModel, data: Any, state: Any, index: int, stage_dir: Path) -> tuple[BaseModel, Fit]:
        """The recipe stage `index` trains under (its `train`, `track` and `seed` reach the Trainer) and its Fit."""
        raise NotImplementedError

    def end_stage(self, cfg: BaseModel, data: Any, state: Any, index: int, stage_dir: Path) -> dict:
        """After stage `index` trained (every rank): keep what `restore_stage` needs (rank 0 writes), return the
        stage's results (JSON, recorded in progress.json and summary.json)."""
        raise NotImplementedError

    def restore_stage(self, cfg: BaseModel, data: Any, state: Any, index: int, stage_dir: Path) -> None:
        """On resume: bring `state` to where it was after stage `index` finished."""
        raise NotImplementedError

    def evaluate_state(self, cfg: BaseModel, data: Any, state: Any, name: str, stages: list[dict]) -> dict:
        """The task's evaluation "before" the first stage and "after" the last ({"metrics": ...}); `stages` holds
        the finished stages' results, so "after" may reuse what the last stage measured."""
        raise NotImplementedError

    def save_state(self, cfg: BaseModel, data: Any, state: Any, run_dir: Path, after: dict, stages: list[dict]) -> dict:
        """Exports and report sections (rank 0 only); returns extra summary.json fields."""
        raise NotImplementedError


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / STAGES / f"{index}-{name}"


def run_stages(task: StagedTask, cfg: BaseModel, overwrite: bool = False, resume: bool = False) -> Path:
    start = time.perf_counter()
    run_dir = Path(cfg.output_dir).expanduser()
    check_launch_environment()  # a refused launch must not leave a run folder behind
    names = task.stage_names(cfg)
    progress = read_progress(run_dir, resume, resume_wanted(resume, cfg.train.resume, overwrite))
    if progress is not None:
        check_resume_matches(run_dir, cfg)
    data = task.prepare(cfg)  # every data error surfaces here, before a run folder exists
    if progress is not None:
        check_resume_data(run_dir, task, data)
    run = open_run(cfg, run_dir, overwrite, None, task.skipped(data), resuming=progress is not None, defer=True)
    state = task.start(cfg, data)
    run.begin()  # only now, with data and model loaded, may --overwrite remove the previous run's files
    write_data_report(run_dir, task, data)
    if progress is not None and is_main_process():
        print(f"Resuming {run_dir} after stage {len(progress['stages'])} of {len(names)}.")
    if progress is None:
        with rng_preserved():  # as in run_task: evaluating must not change the batches training draws
            progress = {"before": task.evaluate_state(cfg, data, state, "before", []), "stages": []}
        save_eval(run_dir, "before", progress["before"])
        _record(run_dir, progress)
    for index, name in enumerate(names):
        folder = stage_dir(run_dir, index, name)
        if index < len(progress["stages"]):  # finished before an interruption
            task.restore_stage(cfg, data, state, index, folder)
            continue
        progress["stages"].append({"name": name, **_train_stage(task, cfg, data, state, index, folder)})
        _record(run_dir, progress)
    after = task.evaluate_state(cfg, data, state, "after", progress["stages"])
    save_eval(run_dir, "after", after)
    if is_main_process():
        extras = task.save_state(cfg, data, state, run_dir, after, progress["stages"])
        last = progress["stages"][-1]
        state_fields = {
            "best_checkpoint": last["best_checkpoint"],
            "global_step": sum(s["global_step"] for s in progress["stages"]),
        }
        write_summary(run_dir, cfg, task, data, start, state_fields, after, {"stages": progress["stages"], **extras})
    return run_dir


def _train_stage(task: StagedTask, cfg: BaseModel, data: Any, state: Any, index: int, folder: Path) -> dict:
    """One stage with the runner's Trainer; resumes from the stage's last checkpoint when there is one."""
    if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
    seed_build(cfg.seed)
    stage_cfg, fit = task.build_stage(cfg, data, state, index, folder)
    if getattr(stage_cfg.train, "deepspeed", None):
        forget_deepspeed_accelerator()
    trainer = make_trainer(stage_cfg, fit, folder)
    train_with_progress(trainer, last_checkpoint(folder))
    weights = keep_better_ema(trainer, stage_cfg.train.metric)
    trainer.record_rank(folder)
    results = task.end_stage(cfg, data, state, index, folder)
    return {
        **results,
        "weights": weights,
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
    }


def forget_deepspeed_accelerator() -> None:
    """What accelerate (1.15) lacks for stages: it keeps one AcceleratorState per process and refuses a second
    DeepSpeed Accelerator while the state holds a DeepSpeed plugin, but each stage trains with a new Trainer (a new
    Accelerator, a new engine). The previous stage's engine is done with by now, so its state goes (the process
    group stays: `reset_partial_state=False`), and with it transformers' handle on its DeepSpeed config; the new
    stage's TrainingArguments set both up again."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=False)


def read_progress(run_dir: Path, flag: bool, recipe_key: bool) -> dict | None:
    """The recorded progress to continue from (None: a fresh run). `--resume` with nothing recorded is refused;
    `train.resume: true` in a recipe then starts fresh (so one recipe serves the first run and every restart)."""
    from visiontune.core.errors import RunDirError

    path = run_dir / STAGES / PROGRESS
    progress = json.loads(path.read_text()) if (flag or recipe_key) and path.is_file() else None
    if flag and progress is None:
        raise RunDirError(
            f"--resume: {run_dir} has no recorded stage progress yet; start it without --resume "
            "(add --overwrite to replace what is there)."
        )
    return progress


def _record(run_dir: Path, progress: dict) -> None:
    """progress.json, replaced atomically: a crash leaves the previous record, never half of one."""
    if not is_main_process():
        return
    path = run_dir / STAGES / PROGRESS
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(progress, indent=2))
    partial.replace(path)
