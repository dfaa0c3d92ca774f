"""The plan of a recipe: the task's own `prepare` and `build` (so the plan sees the data and model training would),
the runner's `make_trainer` in a throw-away folder, then a few measured steps. Nothing is written but plan.json.

The model the task built for the plan is the one stepped: it exists only for the plan and is dropped after it,
so no copy is needed (a copy would double the weights and spoil the memory measurement)."""

from __future__ import annotations

import contextvars
import math
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visiontune.plan.memory import estimate_memory, measure_peak
from visiontune.plan.probe import StepProbe
from visiontune.run.task import Fit, Task

TIMED_STEPS = 3
# True while `make_plan` prepares and builds: a task may then time a pass over all its data (vlm_preference's
# reference log-probs for full tuning) on a few batches and scale it, instead of running it (`setup_seconds`).
_PLANNING = contextvars.ContextVar("visiontune_planning", default=False)


def planning() -> bool:
    return _PLANNING.get()


def plan_config(cfg: BaseModel) -> BaseModel:
    """The recipe as the plan runs it: one process, no trackers (they would open files or a W&B run), no
    DeepSpeed/FSDP sharding (what it measures is one device's full step)."""
    track = cfg.track.model_copy(update={"tensorboard": False, "wandb": False})
    train = cfg.train.model_copy(update={"deepspeed": None, "fsdp": None})
    return cfg.model_copy(update={"track": track, "train": train})


def build_fit(task: Task, cfg: BaseModel, data: Any, folder: Path) -> tuple[BaseModel, Fit]:
    """The Fit training would build; a task that trains in stages is planned on its first stage."""
    from visiontune.run.stages import StagedTask

    if isinstance(task, StagedTask):
        state = task.start(cfg, data)
        stage_cfg, fit = task.build_stage(cfg, data, state, 0, folder)
        return plan_config(stage_cfg), fit
    return cfg, task.build(cfg, data, folder)


def make_plan(task: Task, cfg: BaseModel, steps: int = TIMED_STEPS) -> dict[str, Any]:
    cfg = plan_config(cfg)
    planning_now = _PLANNING.set(True)
    try:
        return _make_plan(task, cfg, steps)
    finally:
        _PLANNING.reset(planning_now)


def _make_plan(task: Task, cfg: BaseModel, steps: int) -> dict[str, Any]:
    from visiontune.run.runner import make_trainer, settled_batch, skipped_json

    data = task.prepare(cfg)
    with tempfile.TemporaryDirectory(prefix="visiontune-plan-") as tmp:
        cfg, fit = build_fit(task, cfg, data, Path(tmp))
        auto = cfg.train.batch_size == "auto"
        cfg = settled_batch(cfg, fit)  # the batch `train.batch_size: auto` would choose now
        trainer = make_trainer(cfg, fit, Path(tmp))
        probe = StepProbe(trainer)
        plan: dict[str, Any] = {
            "task": task.name,
            "device": str(probe.device),
            "samples": {**task.sizes(data), "skipped": len(task.skipped(data))},
            "skipped": skipped_json(task.skipped(data)),
            "parameters": parameter_counts(fit.model),
            "batch": {**batch_settings(cfg, trainer), "auto": auto},
            "precision": cfg.train.precision,
            "method": method(cfg),
        }
        tokens = token_section(data, trainer, cfg)
        if tokens is not None:
            plan["tokens"] = tokens
        plan["memory"] = memory_section(probe, cfg)
        plan["time"] = time_section(probe, trainer, cfg, steps)
    return plan


def parameter_counts(model: Any) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def method(cfg: BaseModel) -> str:
    tune = getattr(cfg, "tune", None)
    if getattr(cfg, "task", None) == "vlm_assemble":  # parts tuned each their own way, no one method
        if cfg.stage == "align":
            return "align: projector"
        parts = [f"vision {tune.vision}", *(["projector"] if tune.train_projector else []), f"language {tune.language}"]
        return "instruct: " + ", ".join(parts)
    return str(getattr(tune, "method", None) or getattr(tune, "mode", None) or "full")


def batch_settings(cfg: BaseModel, trainer: Any) -> dict[str, int]:
    per_device, accum, world = cfg.train.batch_size, cfg.train.grad_accum, trainer.args.world_size
    return {"per_device": per_device, "grad_accum": accum, "world_size": world, "global": per_device * accum * world}


def token_section(data: Any, trainer: Any, cfg: BaseModel) -> dict | None:
    """For tasks whose prepared data holds tokenised records (the VLM tasks) or pairs of them (vlm_preference)."""
    from visiontune.plan.tokens import pair_token_report, token_report

    vlm = getattr(data, "data", None)
    records = getattr(vlm, "train_tokens", None)
    if not records:
        return None
    pairs = all(hasattr(r, "chosen") and hasattr(r, "rejected") for r in records)
    if not pairs and not all(hasattr(r, "input_ids") and hasattr(r, "labels") for r in records):
        return None  # records of another shape
    sampler = trainer._get_train_sampler(trainer.train_dataset)  # the order training draws (length grouping)
    report = (pair_token_report if pairs else token_report)(
        records, data.processor, sampler, cfg.train.batch_size, cfg.seed
    )
    if getattr(cfg.data, "packing", False):  # one row per batch, nothing padded
        report["padding"]["as_training_draws"] = 0.0
    report["packing"] = bool(getattr(cfg.data, "packing", False))
    report["max_length"] = cfg.data.max_length
    report["max_image_pixels"] = cfg.data.max_image_pixels
    return report


def memory_section(probe: StepProbe, cfg: BaseModel) -> dict[str, Any]:
    """The estimate for one training batch, then the peak measured over one real step (after a first step, so
    the optimiser state exists as it does for the rest of a run)."""
    batches = probe.train_batches()
    batch = next(batches)
    probe.model.train()
    estimate = estimate_memory(
        probe.model, batch, lambda: probe.loss(batch), cfg.train.optimizer, getattr(cfg.train, "momentum", 0.0)
    )
    probe.step(batch)
    measured = measure_peak(lambda: probe.step(batch), probe.device)
    return {**estimate.as_json(), "measured_peak": measured}


def time_section(probe: StepProbe, trainer: Any, cfg: BaseModel, steps: int) -> dict[str, Any]:
    """Median step time over `steps` real steps, and the run's expected time from the step counts Trainer will
    use. Validation is timed as loss passes over the validation set; generation metrics (VLMs) are not timed."""
    step_s = probe.timed(probe.step, probe.train_batches(), steps)
    accum = cfg.train.grad_accum
    loader_len = len(trainer.get_train_dataloader())
    per_epoch = max(loader_len // accum + int(loader_len % accum > 0), 1)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.epochs * per_epoch)
    section = {
        "seconds_per_batch": round(step_s, 4),
        "steps_timed": steps,
        "optimizer_steps": total,
        "expected_train_s": round(total * accum * step_s, 1),
    }
    if trainer.eval_dataset is not None and len(trainer.eval_dataset) > 0:
        eval_s, batches = validation_seconds(trainer, steps)
        validations = (
            math.ceil(total / cfg.train.eval_steps) if cfg.train.eval_steps else math.ceil(total / per_epoch)
        ) + 2  # + the evaluations before and after training
        section["seconds_per_validation"] = round(eval_s, 2)
        section["validation_batches_timed"] = batches
        section["validations"] = validations
        section["expected_validation_s"] = round(validations * eval_s, 1)
    setup = sum(
        getattr(d, "setup_seconds", 0.0) for d in (trainer.train_dataset, trainer.eval_dataset) if d is not None
    )
    if setup:  # a pass over the data before training (vlm_preference full tuning: the reference log-probs)
        section["expected_setup_s"] = round(setup, 1)
    section["expected_wall_s"] = round(
        section["expected_train_s"] + section.get("expected_validation_s", 0.0) + setup, 1
    )
    return section


def validation_seconds(trainer: Any, steps: int) -> tuple[float, int]:
    """Seconds of one validation, scaled from the task's own evaluation loop (its metrics included) over the first
    `steps` batches of the validation set. A VLM's generation metrics run on `eval.samples_during_training` records
    whatever the batch count, so scaling overstates them on a large validation set."""
    import time

    from torch.utils.data import Subset

    dataset = trainer.eval_dataset
    per_batch = trainer.args.eval_batch_size
    batches = math.ceil(len(dataset) / per_batch)
    timed = min(steps, batches)
    loader = trainer.get_eval_dataloader(Subset(dataset, range(min(len(dataset), timed * per_batch))))
    start = time.perf_counter()
    trainer.evaluation_loop(loader, "plan", metric_key_prefix="plan")
    return (time.perf_counter() - start) * batches / timed, timed
