"""`task: vlm_sft` — supervised fine-tuning of a vision-language model on conversations.

Reads top to bottom: conversations -> checks -> tokenise once with assistant-only labels (cached) -> model with
frozen / LoRA / QLoRA parts -> Trainer -> generation eval before -> train -> generation eval after -> save.

The transformers `Trainer` runs the loop. TRL's `SFTTrainer` is not used: it re-tokenises every epoch, trains on
prompt and image tokens by default, and cannot check image-token truncation before training — the three things
this task exists to get right (see data/vlm_tokenize.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visiontune.core.errors import DataError
from visiontune.recipe import dump_config
from visiontune.run.callbacks import MetricsJsonl, RichProgress
from visiontune.run.distributed import check_process_group, is_main_process
from visiontune.run.folder import last_checkpoint, prepare_run_dir
from visiontune.run.trainer import VisiontuneTrainer, training_arguments
from visiontune.vlm.collate import VlmCollator
from visiontune.vlm.config import VlmSftConfig
from visiontune.vlm.conversations import Conversation, check_conversations, read_conversations
from visiontune.vlm.generate import generation_report
from visiontune.vlm.model import apply_tuning, enable_grad_checkpointing, load_vlm, trainable_summary
from visiontune.vlm.token_cache import tokenize_cached
from visiontune.vlm.tokenize import Tokenized


@dataclass
class VlmData:
    train: list[Conversation]
    val: list[Conversation]
    train_tokens: list[Tokenized]
    skipped: list[tuple[str, str]]


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Tokenized], convs: list[Conversation]):
        self.records, self.convs = records, convs

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {"input_ids": r.input_ids, "labels": r.labels, "extra": r.extra, "conv": self.convs[r.index]}


class VlmSftTask:
    def train(self, cfg: VlmSftConfig, overwrite: bool = False, resume: bool = False) -> Path:
        start = time.perf_counter()
        run_dir, checkpoint = open_run(cfg, overwrite, resume)
        model, processor = load_vlm(cfg)
        data = prepare_data(cfg, processor, run_dir)
        model = apply_tuning(model, cfg.tune)
        if cfg.train.grad_checkpointing:
            enable_grad_checkpointing(model)
        trainer = build_trainer(model, processor, cfg, data, run_dir)
        if checkpoint is None:
            _write_eval(run_dir, "before", model, processor, data.val, cfg)
        run_training(trainer, checkpoint)
        after = _write_eval(run_dir, "after", trainer.model, processor, data.val, cfg)
        trainer.record_rank(run_dir)
        if is_main_process():
            save_outputs(trainer.model, processor, cfg, run_dir, data, after, time.perf_counter() - start)
        return run_dir

    def evaluate(self, model: str, data: str, out_dir: Path | None = None, **options: Any) -> dict:
        from visiontune.vlm.generate import evaluate_model

        return evaluate_model(model, data, out_dir, **options)

    def predict(self, model: str, inputs: list[str], top_k: int = 5) -> list[dict]:
        from visiontune.core.errors import VisiontuneError

        raise VisiontuneError("predict is for classifiers; for a VLM use `visiontune eval RUN --data FILE`.")


def open_run(cfg: Any, overwrite: bool, resume: bool) -> tuple[Path, Path | None]:
    """The run folder (never overwritten by accident) and the checkpoint to resume from; saves config.yaml."""
    run_dir = Path(cfg.output_dir)
    resume = resume or cfg.train.resume
    checkpoint = prepare_run_dir(run_dir, overwrite, resume) if is_main_process() else None
    if not is_main_process() and resume:
        checkpoint = last_checkpoint(run_dir)
    if is_main_process():
        dump_config(cfg, run_dir / "config.yaml")
    return run_dir, checkpoint


def run_training(trainer: VisiontuneTrainer, checkpoint: Path | None) -> None:
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, RichProgress):
                callback.stop()


def prepare_data(
    cfg: Any,
    processor: Any,
    run_dir: Path,
    read: Callable[[str], list[Conversation]] | None = None,
    model_key: str | None = None,
) -> VlmData:
    """Read, check and tokenise (or load the cached tokenisation of) the train records; split off val.

    `read` turns a data spec into conversations (default: `read_conversations`); `model_key` names the model in
    the tokenisation cache key (default: `cfg.model`). vlm_assemble passes both."""
    d = cfg.data
    read = read or (lambda spec: read_conversations(spec, image_root=d.image_root, dataset_name=d.dataset_name))
    train, bad = check_conversations(read(d.train), d.on_bad_sample)
    if d.val:
        val, bad_val = check_conversations(read(d.val), d.on_bad_sample)
        bad += bad_val
    else:
        train, val = _split(train, d.val_split, cfg.seed)
    tokens, bad_tokens = tokenize_cached(d, processor, train, model_key or cfg.model)
    if not tokens:
        raise DataError(
            f"No record of {d.train} fits for training (first problem: {bad_tokens[0][0]} {bad_tokens[0][1]})."
        )
    report = {"train_records": len(tokens), "val_records": len(val), "skipped": [list(b) for b in bad + bad_tokens]}
    (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    return VlmData(train, val, tokens, bad + bad_tokens)


def _split(convs: list[Conversation], fraction: float, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    if fraction <= 0 or len(convs) < 2:
        return convs, []
    order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(fraction * len(convs)))
    val_idx = set(order[:n_val])
    return [c for i, c in enumerate(convs) if i not in val_idx], [c for i, c in enumerate(convs) if i in val_idx]


def build_trainer(
    model: Any,
    processor: Any,
    cfg: Any,
    data: VlmData,
    run_dir: Path,
    trainer_class: type[VisiontuneTrainer] | None = None,
) -> VisiontuneTrainer:
    args = training_arguments(cfg.train, run_dir, cfg.seed, cfg.data.workers, _report_to(cfg), greater_is_better=False)
    args.eval_strategy = "no"  # generation metrics run before/after; the training loss is logged every step
    args.load_best_model_at_end = False
    args.metric_for_best_model = None
    if cfg.data.group_by_length:
        args.train_sampling_strategy = "group_by_length"
    check_process_group(args.world_size)
    collator = VlmCollator(processor, cfg.data.max_image_pixels)
    trainer = (trainer_class or VlmTrainer)(
        model=model,
        args=args,
        train_dataset=TokenizedDataset(data.train_tokens, data.train),
        data_collator=collator,
        callbacks=[RichProgress(cfg.train.batch_size), MetricsJsonl(run_dir / "metrics.jsonl")],
    )
    trainer.collator_stats = collator
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


class VlmTrainer(VisiontuneTrainer):
    """Logs the padding fraction of the batches seen (our collator counts it)."""

    collator_stats: VlmCollator | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.samples_seen += int(inputs["input_ids"].shape[0])
        return super(VisiontuneTrainer, self).training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.collator_stats is not None and "loss" in logs:
            logs["padding_fraction"] = round(self.collator_stats.padding_fraction(), 4)
        super().log(logs, *args, **kwargs)


def _report_to(cfg: VlmSftConfig) -> list[str]:
    return ["wandb"] if cfg.track.wandb else []


def _write_eval(run_dir: Path, name: str, model: Any, processor: Any, val: list[Conversation], cfg: Any) -> dict:
    if not val:
        return {"metrics": {}}
    limit = cfg.eval.max_samples or len(val)
    report = generation_report(
        model, processor, val[:limit], cfg.eval.metrics, cfg.eval.max_new_tokens, cfg.data.max_image_pixels
    )
    if is_main_process():
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / f"{name}.json").write_text(json.dumps(report, indent=2))
    return report


def save_outputs(
    model: Any, processor: Any, cfg: VlmSftConfig, run_dir: Path, data: VlmData, after: dict, wall_time: float
) -> None:
    """LoRA/QLoRA: the adapter in PEFT's own format (`adapter/`); full: the whole model (`model/`)."""
    from peft import PeftModel

    from visiontune.report import write_report

    target = run_dir / ("adapter" if isinstance(model, PeftModel) else "model")
    model.save_pretrained(target)
    processor.save_pretrained(target)
    (target / "visiontune.json").write_text(
        json.dumps({"kind": "vlm", "base_model": cfg.model, "tune": cfg.tune.method}, indent=2)
    )
    summary = {
        "wall_time_s": round(wall_time, 1),
        "train_samples": len(data.train_tokens),
        "val_samples": len(data.val),
        "skipped_samples": [{"ref": r, "reason": w} for r, w in data.skipped],
        "trainable_parameters": trainable_summary(model),
        "final_metrics": after.get("metrics", {}),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(run_dir)
