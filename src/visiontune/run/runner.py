"""The one run lifecycle, for every task.

check data -> lock the run folder (only now: a failed check leaves nothing behind) -> build -> remove what
--overwrite replaces, config.yaml, data_report.json -> Trainer with tracking, validation, best checkpoint, early
stopping, EMA -> evaluate before -> train (or resume) -> evaluate after -> per-rank record -> save (rank 0) ->
summary.json -> report.

A task supplies only what is its own (see `visiontune.run.task.Task`). Tasks that train several times in one run
folder (clip_continual) run on the same pieces through `visiontune.run.stages`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visiontune.run.distributed import check_launch_environment, check_same_checkpoint, is_main_process
from visiontune.run.folder import last_checkpoint, lock_run_dir, open_run_dir, recipe_paths, resume_wanted
from visiontune.run.task import Fit, Skipped, Task


@dataclass
class RunStart:
    run_dir: Path
    checkpoint: Path | None  # the checkpoint to resume from; None for a fresh run
    begin: Callable[..., None] = lambda cfg=None: None  # see open_run's `defer`; a no-op on ranks other than 0


def run_task(task: Task, cfg: BaseModel, overwrite: bool = False, resume: bool = False) -> Path:
    start = time.perf_counter()
    run_dir = Path(cfg.output_dir).expanduser()
    check_launch_environment()  # a refused launch must not leave a run folder behind
    from visiontune.run.arguments import check_deepspeed

    check_deepspeed(cfg.train)
    checkpoint = resume_point(run_dir, resume, resume_wanted(resume, cfg.train.resume, overwrite))
    if checkpoint is not None:
        cfg = resumed_batch(run_dir, cfg)
        check_resume_matches(run_dir, cfg)
    data = task.prepare(cfg)  # every data error surfaces here, before a run folder exists
    if checkpoint is not None:
        check_resume_data(run_dir, task, data)
    run = open_run(cfg, run_dir, overwrite, checkpoint, task.skipped(data), defer=True)
    seed_build(cfg.seed)
    fit = task.build(cfg, data, run_dir)
    cfg = settled_batch(cfg, fit)  # train.batch_size: auto / global_batch_size -> the numbers config.yaml records
    run.begin(cfg)  # only now, with data and model loaded, may --overwrite remove the previous run's files
    write_data_report(run_dir, task, data)
    trainer = make_trainer(cfg, fit, run_dir)
    check_same_checkpoint(checkpoint)  # the process group exists now: all ranks resume from one checkpoint
    after = fit_and_evaluate(task, cfg, fit, trainer, data, run)
    from visiontune.run.trainer import full_weights

    with full_weights(trainer):  # ZeRO-3: the record and the exports need whole weights
        trainer.record_rank(run_dir)
        if is_main_process():
            with models_load_whole():
                extras = task.save(cfg, fit, trainer, data, run_dir, after)
            state = {"best_checkpoint": trainer.state.best_model_checkpoint, "global_step": trainer.state.global_step}
            write_summary(run_dir, cfg, task, data, start, state, after, extras)
    return run_dir


@contextlib.contextmanager
def models_load_whole() -> Iterator[None]:
    """Models that rank 0 alone builds or reads while saving (the LLaVA export, WiSE-FT, export_state_to) stay whole.
    While a ZeRO-3 Trainer lives, transformers partitions every new model over all ranks (DeepSpeed's zero.Init), a
    collective the other ranks never join: rank 0 waited there until gloo's timeout (seen on two CPU ranks)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers' own global; it has no public getter
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if live is not None and live() is not None:
            hf_deepspeed.set_hf_deepspeed_config(live())


def seed_build(seed: int) -> None:
    """New weights made while building (LoRA's A matrices, a replaced head) start from the recipe's seed, not from
    whatever the process drew before: the Trainer seeds only when it is made, after the model exists, so without this
    a resumed run (or a second run in one process) could start its adapters differently."""
    from transformers import set_seed

    set_seed(seed)


def settled_batch(cfg: BaseModel, fit: Fit) -> BaseModel:
    from visiontune.plan.batch import needs_settling, settle_batch
    from visiontune.run.distributed import launched_world_size

    return settle_batch(cfg, fit, launched_world_size()) if needs_settling(cfg.train) else cfg


def resumed_batch(run_dir: Path, cfg: BaseModel) -> BaseModel:
    """A resumed run with `train.batch_size: auto` or `train.global_batch_size` trains with the batch and
    accumulation it settled on when it started (config.yaml)."""
    import yaml

    from visiontune.plan.batch import needs_settling

    saved = run_dir / "config.yaml"
    if not needs_settling(cfg.train) or not saved.is_file():
        return cfg
    from visiontune.plan.batch import with_batch

    train = (yaml.safe_load(saved.read_text()) or {}).get("train", {})
    if not isinstance(train.get("batch_size"), int):
        return cfg
    return with_batch(cfg, train["batch_size"], train.get("grad_accum", cfg.train.grad_accum))


def check_resume_data(run_dir: Path, task: Task, data: Any) -> None:
    """A resumed run must read the data its checkpoints were trained on; checked before anything is written."""
    from visiontune.core.identity import check_resume_data as check

    check(run_dir / "data_report.json", task.findings(data))


def write_data_report(run_dir: Path, task: Task, data: Any) -> None:
    if is_main_process():
        report = {**task.sizes(data), **task.findings(data), "skipped": skipped_json(task.skipped(data))}
        write_json(run_dir / "data_report.json", report)


def world_size() -> int:
    from visiontune.run.distributed import launched_world_size

    return launched_world_size()


def write_summary(
    run_dir: Path, cfg: BaseModel, task: Task, data: Any, start: float, state: dict, after: dict, extras: dict
) -> None:
    """summary.json (the same fields for every task, plus the task's `extras`), then the report. Rank 0 only."""
    summary = {
        "task": cfg.task,
        "wall_time_s": round(time.perf_counter() - start, 1),
        **task.sizes(data),
        "skipped_samples": skipped_json(task.skipped(data)),
        **state,
        "final_metrics": after.get("metrics", {}),
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
        **extras,
    }
    write_json(run_dir / "summary.json", summary)
    from visiontune.export.card import write_run_cards
    from visiontune.report import write_report

    write_report(run_dir)
    write_run_cards(run_dir)  # README.md model cards in model/ (adapter/), from config.yaml and eval/after.json


def resume_point(run_dir: Path, flag: bool, recipe_key: bool) -> Path | None:
    """`--resume` needs a checkpoint; `train.resume: true` in a recipe resumes when there is one and otherwise
    starts fresh (so the same recipe serves the first run and every restart)."""
    from visiontune.core.errors import RunDirError

    checkpoint = last_checkpoint(run_dir) if (flag or recipe_key) else None
    if flag and checkpoint is None:
        raise RunDirError(
            f"--resume: {run_dir} has no complete checkpoint yet; start it without --resume "
            "(add --overwrite to replace what is there)."
        )
    return checkpoint


# Keys a resumed run may change: where the run folder is (it may have moved), how long it trains, what it reports.
# Anything else (model, data, tuning, batch size...) would silently mix two different runs in one set of checkpoints.
RESUME_MAY_CHANGE = ("output_dir", "train.epochs", "train.max_steps", "train.resume", "train.logging_steps", "track.")


def check_resume_matches(run_dir: Path, cfg: BaseModel) -> None:
    import yaml

    from visiontune.core.errors import RunDirError

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved, now = _flatten(yaml.safe_load(saved_path.read_text()) or {}), _flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    changed = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        raise RunDirError(
            f"--resume: the recipe differs from the run's {saved_path} in {', '.join(changed[:5])}; resume with "
            "the recipe that started the run (only train.epochs, train.max_steps, train.logging_steps and track keys "
            "may change) or use a new output_dir."
        )


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def open_run(
    cfg: BaseModel,
    run_dir: Path,
    overwrite: bool,
    checkpoint: Path | None,
    skipped: list[Skipped],
    resuming: bool | None = None,
    defer: bool = False,
) -> RunStart:
    """Check and lock (rank 0) the run folder, or reopen it when resuming; then begin the run: remove the previous
    run's files (--overwrite), save config.yaml, say what matters once. With `defer`, beginning waits for the
    caller's `RunStart.begin()`, so a model load that fails in between leaves the previous run as it was.
    `resuming` defaults to "there is a checkpoint"; a multi-stage task that resumes between stages passes True."""
    resuming = checkpoint is not None if resuming is None else resuming
    run = RunStart(run_dir, checkpoint)
    if is_main_process():
        from visiontune.recipe import dump_config

        opened = None
        if checkpoint is not None or not resuming:
            opened = open_run_dir(run_dir, overwrite, resuming, recipe_paths(cfg.model_dump(mode="json")))
        else:
            lock_run_dir(run_dir)  # between the stages of a resumed run: nothing to check, still one writer

        def begin(settled: BaseModel | None = None) -> None:
            """`settled`: the recipe with what the run decided when it started (the batch of batch_size: auto)."""
            if opened is not None:
                opened.begin()
            dump_config(settled or cfg, run_dir / "config.yaml")
            announce(run_dir, checkpoint, skipped)

        run.begin = begin
        if not defer:
            begin()
    return run


def announce(run_dir: Path, checkpoint: Path | None, skipped: list[Skipped]) -> None:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        console.print(
            f"Resuming from {checkpoint} (step {state.get('global_step')} of {state.get('max_steps')}).",
            markup=False,
            soft_wrap=True,
        )
    if skipped:
        console.print(
            f"Skipped {len(skipped)} unreadable sample(s) (data.on_bad_sample: skip); "
            f"the list is in {run_dir / 'data_report.json'}.",
            markup=False,
            soft_wrap=True,
        )


def make_trainer(cfg: BaseModel, fit: Fit, run_dir: Path) -> Any:
    """The Trainer every task trains with: its arguments from the recipe's `train` section, tracking from
    `track`, validation when there is validation data, early stopping, EMA, progress and metrics.jsonl."""
    from transformers.trainer_callback import PrinterCallback

    from visiontune.run.arguments import training_arguments
    from visiontune.run.callbacks import WeightEma
    from visiontune.run.cpu_dropout import cheapen_lora_dropout
    from visiontune.run.distributed import check_process_group
    from visiontune.run.optim import build_optimizer
    from visiontune.run.trainer import VisiontuneTrainer

    cfg = settled_batch(cfg, fit)  # a staged task's stage (or a caller that did not settle it)
    train = cfg.train
    validate = fit.eval_dataset is not None and len(fit.eval_dataset) > 0
    report_to = tracking(cfg.track, run_dir)
    args = training_arguments(train, run_dir, cfg.seed, fit.workers, report_to, validate, **fit.args)
    check_process_group(args.world_size)
    ema = WeightEma(fit.model, train.ema.decay) if getattr(train, "ema", None) is not None else None
    per_step = train.batch_size * train.grad_accum * args.world_size
    callbacks = [*standard_callbacks(cfg, run_dir, per_step, fit.items, validate), *fit.callbacks]
    if args.device.type == "cpu":
        cheapen_lora_dropout(fit.model)  # torch's CPU dropout masks were a fifth of a LoRA step
    trainer = (fit.trainer_class or VisiontuneTrainer)(
        model=fit.model,
        args=args,
        train_dataset=fit.train_dataset,
        eval_dataset=fit.eval_dataset if validate else None,
        data_collator=fit.collator,
        compute_metrics=fit.compute_metrics,
        callbacks=callbacks + ([ema] if ema else []),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.make_optimizer = fit.make_optimizer or (
        lambda model: build_optimizer(
            model, lr=train.lr, weight_decay=train.weight_decay, optimizer=train.optimizer, momentum=train.momentum
        )
    )
    trainer.ema = ema
    for name, value in fit.trainer_attrs.items():
        setattr(trainer, name, value)
    return trainer


def standard_callbacks(cfg: BaseModel, run_dir: Path, per_step: int, items: str, validate: bool) -> list[Any]:
    from transformers import EarlyStoppingCallback

    from visiontune.run.callbacks import MetricsJsonl, RichProgress

    callbacks: list[Any] = [RichProgress(per_step, items), MetricsJsonl(run_dir / "metrics.jsonl")]
    if cfg.track.tensorboard and is_main_process():
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(run_dir / "tb")  # it reopens its writer after train end; keep one folder
        callbacks.append(tensorboard)
    if cfg.train.early_stopping_patience and validate:
        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience))
    return callbacks


def tracking(track: BaseModel, run_dir: Path) -> list[str]:
    """`report_to` for the Trainer; W&B reads its project, mode and folder from the environment."""
    if not track.wandb:
        return []
    os.environ["WANDB_PROJECT"] = track.wandb_project
    os.environ["WANDB_MODE"] = track.wandb_mode
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    return ["wandb"]


def fit_and_evaluate(task: Task, cfg: BaseModel, fit: Fit, trainer: Any, data: Any, run: RunStart) -> dict:
    """Evaluate before (fresh runs), train or resume, keep the better of trained/EMA weights, evaluate after."""
    if run.checkpoint is None:
        with rng_preserved():  # else a resumed run (no eval before) would draw other batches than the first one
            save_eval(run.run_dir, "before", task.evaluate_run(cfg, fit, trainer, data, "before"))
    train_with_progress(trainer, run.checkpoint)
    weights = keep_better_ema(trainer, cfg.train.metric)
    after = task.evaluate_run(cfg, fit, trainer, data, "after")
    after["weights"] = weights
    save_eval(run.run_dir, "after", after)
    return after


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Leave the global RNGs as they were: evaluating draws from them (each DataLoader iterator takes a seed), and
    samplers such as length grouping draw the training order from them."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def train_with_progress(trainer: Any, checkpoint: Path | None) -> None:
    """Train (or resume); the progress bar is stopped even on Ctrl-C so the terminal is left clean."""
    from visiontune.run.callbacks import RichProgress

    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, RichProgress):
                callback.stop()


def keep_better_ema(trainer: Any, metric: str) -> str:
    """With EMA on, evaluate the averaged weights too and keep whichever scores better on validation."""
    ema = getattr(trainer, "ema", None)
    if ema is None or trainer.eval_dataset is None:
        return "trained"
    model = trainer.model
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    score_trained = trainer.evaluate(metric_key_prefix="final_trained")[f"final_trained_{metric}"]
    model.load_state_dict(ema.averaged_state())
    score_ema = trainer.evaluate(metric_key_prefix="final_ema")[f"final_ema_{metric}"]
    better_ema = score_ema >= score_trained if "loss" not in metric else score_ema <= score_trained
    if not better_ema:
        model.load_state_dict(trained)
    return "ema" if better_ema else "trained"


def save_eval(run_dir: Path, name: str, report: dict) -> None:
    if is_main_process():
        (run_dir / "eval").mkdir(exist_ok=True)
        write_json(run_dir / "eval" / f"{name}.json", report)


def skipped_json(skipped: list[Skipped]) -> list[dict[str, str]]:
    return [{"ref": s.ref, "reason": s.reason} for s in skipped]


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2))
