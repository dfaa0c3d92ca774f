"""Glue on the transformers `Trainer`. What we add that Trainer lacks: atomic checkpoints (written to
`.partial/` then renamed into place) and a per-rank record of the samples each process trained on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from visiontune.config.schema import TrainConfig
from visiontune.train.rundir import CHECKPOINTS

PARTIAL = ".partial"


class VisiontuneTrainer(Trainer):
    samples_seen = 0
    batch_mixer = None  # mixup/cutmix, applied to training batches only (the collator also serves evaluation)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.samples_seen += int(inputs["pixel_values"].shape[0])
        if self.batch_mixer is not None and inputs["labels"].ndim == 1:
            inputs["pixel_values"], inputs["labels"] = self.batch_mixer(inputs["pixel_values"], inputs["labels"])
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint under `.partial/`, then move it into place with one atomic rename, so a kill
        mid-save leaves the previous checkpoint as the newest complete one."""
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, PARTIAL)
        staging, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staging):
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging_root  # Trainer writes run_dir/checkpoint-N from args.output_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.state.best_model_checkpoint == staging:
            self.state.best_model_checkpoint = final
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staging, "trainer_state.json"))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staging, final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def record_rank(self, run_dir: Path) -> dict:
        """Write `ranks/rank{R}.json`: samples trained on and a weight checksum (DDP ranks must agree)."""
        model = self.accelerator.unwrap_model(self.model)
        checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
        record = {
            "rank": self.args.process_index,
            "world_size": self.args.world_size,
            "samples_seen": self.samples_seen,
            "weight_checksum": checksum,
        }
        out = run_dir / "ranks"
        out.mkdir(exist_ok=True)
        (out / f"rank{self.args.process_index}.json").write_text(json.dumps(record))
        return record


def _check_deepspeed(cfg: TrainConfig) -> None:
    import importlib.util

    from visiontune.errors import RecipeError

    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(
            "train.deepspeed needs the deepspeed package: `pip install deepspeed==0.19.8` (or remove it)."
        )
    if cfg.deepspeed and not os.path.isfile(cfg.deepspeed):
        raise RecipeError(f"train.deepspeed: {cfg.deepspeed} does not exist; see configs/deepspeed/ for examples.")


def training_arguments(
    cfg: TrainConfig, run_dir: Path, seed: int, workers: int, report_to: list[str], greater_is_better: bool
) -> TrainingArguments:
    _check_deepspeed(cfg)
    use_cpu = cfg.cpu if cfg.cpu is not None else not torch.cuda.is_available()
    per_epoch = cfg.eval_steps is None
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
        warmup_steps=cfg.warmup_ratio,
        eval_strategy="epoch" if per_epoch else "steps",
        save_strategy="epoch" if per_epoch else "steps",
        eval_steps=cfg.eval_steps,
        save_steps=cfg.eval_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=cfg.metric,
        greater_is_better=greater_is_better,
        logging_steps=cfg.logging_steps,
        report_to=report_to,
        seed=seed,
        data_seed=seed,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        use_cpu=use_cpu,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        disable_tqdm=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        deepspeed=cfg.deepspeed,
        fsdp=cfg.fsdp or "",
        ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
