"""`task: vlm_sft` — supervised fine-tuning of a vision-language model on conversations.

What is its own: conversations (checked, tokenised once with assistant-only labels, cached), the model with
frozen / LoRA / QLoRA parts, validation by loss + generation metrics, the adapter or model export. The runner
(`visiontune.run.runner`) does the rest.

The transformers `Trainer` runs the loop. TRL's `SFTTrainer` is not used: it re-tokenises every epoch, trains on
prompt and image tokens by default, and cannot check image-token truncation before training — the three things
this task exists to get right (see vlm/tokenize.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visiontune.core.errors import DataError
from visiontune.core.identity import fingerprint
from visiontune.core.manifest import write_manifest
from visiontune.run.task import Fit, Skipped, Task
from visiontune.run.trainer import VisiontuneTrainer
from visiontune.vlm.collate import VlmCollator
from visiontune.vlm.config import VlmSftConfig
from visiontune.vlm.conversations import (
    Conversation,
    check_conversation_splits,
    check_conversations,
    conversation_duplicates,
    conversation_groups,
    identify_conversations,
    read_conversations,
    refuse_conversation_leak,
)
from visiontune.vlm.generate import generation_report
from visiontune.vlm.mixed_batches import keep_ranks_in_step
from visiontune.vlm.model import apply_tuning, enable_grad_checkpointing, load_vlm, trainable_summary
from visiontune.vlm.token_cache import tokenize_cached
from visiontune.vlm.tokenize import Tokenized, say_truncation, truncation


@dataclass
class VlmData:
    train: list[Conversation]
    val: list[Conversation]
    train_tokens: list[Tokenized]
    skipped: list[tuple[str, str]]
    val_tokens: list[Tokenized] = field(default_factory=list)


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Tokenized], convs: list[Conversation]):
        self.records, self.convs = records, convs

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {"input_ids": r.input_ids, "labels": r.labels, "extra": r.extra, "conv": self.convs[r.index]}


@dataclass
class VlmPrepared:
    """A VLM task's checked inputs: the model and processor (the processor tokenises), and the data."""

    model: Any
    processor: Any
    data: VlmData


class VlmSftTask(Task):
    name = "vlm_sft"

    def prepare(self, cfg: VlmSftConfig) -> VlmPrepared:
        model, processor = load_vlm(cfg)
        return VlmPrepared(model, processor, prepare_data(cfg, processor))

    def skipped(self, prepared: VlmPrepared) -> list[Skipped]:
        return [Skipped(ref, reason) for ref, reason in prepared.data.skipped]

    def sizes(self, prepared: VlmPrepared) -> dict[str, int]:
        return {"train_samples": len(prepared.data.train_tokens), "val_samples": len(prepared.data.val)}

    def findings(self, prepared: VlmPrepared) -> dict:
        return vlm_findings(prepared.data)

    def build(self, cfg: VlmSftConfig, prepared: VlmPrepared, run_dir: Path) -> Fit:
        model = apply_tuning(prepared.model, cfg.tune)
        if cfg.train.grad_checkpointing:
            enable_grad_checkpointing(model)
        return vlm_fit(cfg, model, prepared.processor, prepared.data)

    def evaluate_run(self, cfg: VlmSftConfig, fit: Fit, trainer: Any, prepared: VlmPrepared, name: str) -> dict:
        return evaluate_vlm(trainer, name)

    def save(
        self, cfg: VlmSftConfig, fit: Fit, trainer: Any, prepared: VlmPrepared, run_dir: Path, after: dict
    ) -> dict:
        """LoRA/QLoRA: the adapter in PEFT's own format (`adapter/`); full: the whole model (`model/`)."""
        from peft import PeftModel

        model, processor = trainer.model, prepared.processor
        target = run_dir / ("adapter" if isinstance(model, PeftModel) else "model")
        model.save_pretrained(target)
        processor.save_pretrained(target)
        write_manifest(target, "vlm", base_model=cfg.model, tune=cfg.tune.method)
        return {"trainable_parameters": trainable_summary(model)}

    def evaluate(self, model: str, data: str, out_dir: Path | None = None, **options: Any) -> dict:
        from visiontune.vlm.generate import evaluate_model

        return evaluate_model(model, data, out_dir, **options)

    def predict(self, model: str, inputs: list[str], top_k: int = 5, prompt: str | None = None) -> list[dict]:
        """The answer to `prompt` (predict --prompt) about each image; `top_k` means nothing to a VLM."""
        from visiontune.vlm.ask import predict_images

        return predict_images(model, inputs, prompt)


def prepare_data(
    cfg: Any, processor: Any, read: Callable[[str], list[Conversation]] | None = None, model_key: str | None = None
) -> VlmData:
    """Read and check train and val records, split off val when none is given, and tokenise both (or load their
    cached tokenisation). `read` turns a data spec into conversations (default: `read_conversations`);
    `model_key` names the model in the tokenisation cache key (default: `cfg.model`). vlm_assemble passes both."""
    d = cfg.data
    read = read or (lambda spec: read_conversations(spec, image_root=d.image_root, dataset_name=d.dataset_name))
    if d.val:  # one check over both, so every bad record is named at once
        kept, bad = check_conversation_splits({"train": read(d.train), "val": read(d.val)}, d.on_bad_sample)
        train, val = kept["train"], kept["val"]
        refuse_conversation_leak(train, val)
    else:
        train, bad = check_conversations(read(d.train), d.on_bad_sample)
        train, val = _split(train, d.val_split, cfg.seed)
    settings = {
        "max_length": d.max_length,
        "max_image_pixels": d.max_image_pixels,
        "train_on": d.train_on,
        "on_bad_sample": d.on_bad_sample,
        "cache": d.cache,
    }
    key = model_key or cfg.model
    tokens, bad_tokens = tokenize_cached(processor, train, key, **settings)
    if not tokens:
        raise DataError(
            f"No record of {d.train} fits for training (first problem: {bad_tokens[0][0]} {bad_tokens[0][1]})."
        )
    val_tokens, bad_val_tokens = tokenize_cached(processor, val, key, **settings) if val else ([], [])
    data = VlmData(train, val, tokens, bad + bad_tokens + bad_val_tokens, val_tokens)
    say_truncation(vlm_findings(data)["truncated"], d.max_length)
    return data


def vlm_findings(data: VlmData) -> dict:
    """data_report.json: records cut at data.max_length and the answer tokens lost, repeated records per split, and
    the fingerprint a resume must find unchanged."""
    splits = {"train": data.train, "val": data.val}
    identify_conversations(data.train, data.val)
    records = {role: ([c.keys for c in convs], []) for role, convs in splits.items()}
    return {
        "truncated": {"train": truncation(data.train_tokens), "val": truncation(data.val_tokens)},
        "duplicates": {role: conversation_duplicates(convs) for role, convs in splits.items()},
        "data": fingerprint(records, None),
    }


def _split(convs: list[Conversation], fraction: float, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded split of the conversations that keeps those sharing an image (or repeating a record) on one side."""
    same = conversation_groups(convs)
    if fraction <= 0 or len(same) < 2:
        return convs, []
    order = torch.randperm(len(same), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(fraction * len(same)))
    val_idx = {i for g in order[:n_val] for i in same[g]}
    return [c for i, c in enumerate(convs) if i not in val_idx], [c for i, c in enumerate(convs) if i in val_idx]


def vlm_fit(cfg: Any, model: Any, processor: Any, data: VlmData, trainer_class: type | None = None) -> Fit:
    """What the Trainer needs for a VLM: tokenised records, the padding collator, and validation that reports
    the loss plus the recipe's generation metrics on a bounded sample (`eval.samples_during_training`)."""
    if getattr(cfg.data, "packing", False):
        from visiontune.vlm.packed_attention import use_packed_attention
        from visiontune.vlm.packing import PackedCollator, rope_index_of

        collator = PackedCollator(processor, cfg.data.max_image_pixels, rope_index_of(model))
        use_packed_attention(model)  # SDPA per record, not over the whole row
    else:
        collator = VlmCollator(processor, cfg.data.max_image_pixels)
    generation = GenerationEval(processor, data.val, cfg.eval, cfg.data.max_image_pixels)
    keep_ranks_in_step(model, processor, cfg.data.max_image_pixels, data.train + data.val)  # mixed_batches.py
    args: dict[str, Any] = {"train_sampling_strategy": "group_by_length"} if cfg.data.group_by_length else {}
    return Fit(
        model=model,
        train_dataset=TokenizedDataset(data.train_tokens, data.train),
        eval_dataset=TokenizedDataset(data.val_tokens, data.val),
        collator=collator,
        trainer_class=trainer_class or VlmTrainer,
        trainer_attrs={"collator_stats": collator, "generation": generation},
        args=args,
        items="seq",
        workers=cfg.data.workers,
    )


def evaluate_vlm(trainer: Any, name: str) -> dict:
    """Validation loss and generation metrics over `eval.max_samples` records (all by default), with answers."""
    if trainer.eval_dataset is None:
        return {"metrics": {}}
    trainer.generation.full = True
    try:
        metrics = trainer.evaluate(metric_key_prefix=name)
    finally:
        trainer.generation.full = False
    scalars = {k.removeprefix(f"{name}_"): v for k, v in metrics.items() if not k.endswith(_TIMINGS)}
    return {"metrics": scalars, "samples": trainer.generation.last_samples}


_TIMINGS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch")


class GenerationEval:
    """The task's own metric during validation: greedy answers to the val records, scored by `eval.metrics`.
    During training it runs on the first `eval.samples_during_training` records (generation is slow); before and
    after training on `eval.max_samples` (default all)."""

    def __init__(self, processor: Any, val: list[Conversation], eval_cfg: Any, max_pixels: int):
        self.processor, self.val, self.cfg, self.max_pixels = processor, val, eval_cfg, max_pixels
        self.full = False
        self.last_samples: list[dict] = []

    def __call__(self, model: Any) -> dict[str, float]:
        limit = (self.cfg.max_samples or len(self.val)) if self.full else self.cfg.samples_during_training
        records = self.val[:limit]
        if not records:
            return {}
        report = generation_report(
            model, self.processor, records, self.cfg.metrics, self.cfg.max_new_tokens, self.max_pixels
        )
        self.last_samples = report["samples"]
        return report["metrics"]


class VlmTrainer(VisiontuneTrainer):
    """Adds to Trainer: the padding fraction of the batches seen (our collator counts it) in the logs, and the
    generation metrics in every evaluation (added to the loop's metrics, so logging, the best checkpoint by
    `train.metric` and early stopping all see them)."""

    collator_stats: VlmCollator | None = None
    generation: GenerationEval | None = None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        if self.generation is not None:
            scores = self.generation(self.accelerator.unwrap_model(self.model))
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.samples_seen += self.records(inputs)
        return super(VisiontuneTrainer, self).training_step(model, inputs, num_items_in_batch)

    def records(self, inputs: dict) -> int:
        """Records in a batch: its rows, or those packed into its one row (data.packing)."""
        if "position_ids" in inputs and "attention_mask" not in inputs:
            from visiontune.vlm.packing import records_in

            return records_in(inputs["position_ids"])
        return int(inputs["input_ids"].shape[0])

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.collator_stats is not None and "loss" in logs:
            logs["padding_fraction"] = round(self.collator_stats.padding_fraction(), 4)
        super().log(logs, *args, **kwargs)
