"""`task: vlm_preference` — preference tuning (DPO, IPO, hinge, robust DPO, SimPO, ORPO; optional RPO term) of a VLM
on pairs of answers to the same prompt and image(s), for every family vlm_sft supports and for assembled VLMs
(`init_from` a vlm_assemble run; vlm/preference_assembled.py).

What is its own: the pairs (vlm/preference_data.py; checked like SFT conversations, tokenised once per answer and
cached), the reference, the loss and TRL's reward metrics. The model, LoRA / QLoRA, the generation evaluation and the
export are vlm_sft's; the runner does the rest.

The reference costs no second model: with LoRA / QLoRA it is the same model with its adapters switched off (PEFT's
`disable_adapter()`), with full tuning its log-probabilities are computed once before training and cached in
safetensors, keyed on the model's files and the pairs' tokens and images (vlm/preference_reference.py). SimPO and
ORPO need none. Each step runs one forward over [chosen; rejected] (as TRL does), but each pair's images go through
the vision tower and projector once, not once per answer (vlm/preference_forward.py).

TRL's `DPOTrainer` is not used: it tokenises per epoch with its own prompt/completion split, and its VLM path is
where users lose `pixel_values` / `image_grid_thw`; here the SFT task's tokenisation (assistant-only labels, image-safe
truncation, the cache) serves both answers, and the losses are TRL's formulas (vlm/preference_loss.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from visiontune.core.errors import DataError
from visiontune.core.identity import fingerprint
from visiontune.run.task import Fit, Skipped
from visiontune.vlm.collate import VlmCollator
from visiontune.vlm.conversations import (
    Conversation,
    check_conversation_splits,
    conversation_duplicates,
    identify_conversations,
    refuse_conversation_leak,
)
from visiontune.vlm.mixed_batches import keep_ranks_in_step
from visiontune.vlm.model import apply_tuning, enable_grad_checkpointing, load_vlm
from visiontune.vlm.preference_config import VlmPreferenceConfig
from visiontune.vlm.preference_data import PreferencePair, read_preferences
from visiontune.vlm.preference_forward import answer_logps
from visiontune.vlm.preference_loss import loss_settings, preference_loss
from visiontune.vlm.sft import GenerationEval, VlmSftTask, VlmTrainer, _split, evaluate_vlm
from visiontune.vlm.token_cache import tokenize_cached
from visiontune.vlm.tokenize import Tokenized


@dataclass
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    index: int  # into PreferenceData.train / .val


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    val: list[PreferencePair]
    train_tokens: list[TokenizedPair]
    val_tokens: list[TokenizedPair]
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PreferencePrepared:
    model: Any
    processor: Any
    data: PreferenceData


class PairDataset(torch.utils.data.Dataset):
    """One item per pair: both tokenised answers, their conversations (images), and the reference log-probs when
    they were computed before training."""

    def __init__(self, tokens: list[TokenizedPair], pairs: list[PreferencePair]):
        self.tokens, self.pairs = tokens, pairs
        self.reference: torch.Tensor | None = None  # [N, 2] (chosen, rejected), set for full tuning

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = self.tokens[i]
        pair = self.pairs[t.index]
        item = {"chosen": _row(t.chosen, pair.chosen), "rejected": _row(t.rejected, pair.rejected)}
        if self.reference is not None:
            item["reference"] = self.reference[i]
        return item


def _row(record: Tokenized, conv: Conversation) -> dict[str, Any]:
    return {"input_ids": record.input_ids, "labels": record.labels, "extra": record.extra, "conv": conv}


class PairCollator(VlmCollator):
    """[chosen answers; rejected answers] as one padded batch of 2B text rows, the image inputs of the B chosen rows
    only (the rejected rows have the same images: vlm/preference_forward.py encodes them once for both), plus
    `ref_logps` [2B] when the reference was computed before training."""

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rejected = [{**i["rejected"], "conv": replace(i["rejected"]["conv"], images=[])} for i in items]
        batch = super().__call__([i["chosen"] for i in items] + rejected)
        if "reference" in items[0]:
            ref = torch.stack([i["reference"] for i in items])
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch

    def pixels(self, images: list[list]) -> dict[str, torch.Tensor]:
        return super().pixels(images[: len(images) // 2])


class VlmPreferenceTask(VlmSftTask):
    """vlm_sft's model, export and evaluation of saved models; its own data, reference and loss."""

    name = "vlm_preference"

    def prepare(self, cfg: VlmPreferenceConfig) -> PreferencePrepared:
        if cfg.init_from:
            from visiontune.vlm.preference_assembled import load_assembled_start

            model, processor = load_assembled_start(cfg)
        else:
            model, processor = load_vlm(cfg)
        return PreferencePrepared(model, processor, prepare_preferences(cfg, processor))

    def skipped(self, prepared: PreferencePrepared) -> list[Skipped]:
        return [Skipped(ref, reason) for ref, reason in prepared.data.skipped]

    def sizes(self, prepared: PreferencePrepared) -> dict[str, int]:
        return {"train_samples": len(prepared.data.train_tokens), "val_samples": len(prepared.data.val_tokens)}

    def findings(self, prepared: PreferencePrepared) -> dict:
        d = prepared.data
        chosen = {"train": [p.chosen for p in d.train], "val": [p.chosen for p in d.val]}
        identify_conversations(chosen["train"], chosen["val"])
        records = {
            role: ([(*c.keys, p.rejected.turns[-1].text) for c, p in zip(convs, pairs, strict=True)], [])
            for (role, convs), pairs in zip(chosen.items(), (d.train, d.val), strict=True)
        }
        return {
            "duplicates": {role: conversation_duplicates(convs) for role, convs in chosen.items()},
            "data": fingerprint(records, None),
        }

    def build(self, cfg: VlmPreferenceConfig, prepared: PreferencePrepared, run_dir: Path) -> Fit:
        from visiontune.vlm.preference_assembled import full_tuning_trainer, tune_assembled
        from visiontune.vlm.preference_reference import reference_mode, set_reference

        if cfg.init_from:
            model = tune_assembled(prepared.model, cfg.tune)
            if cfg.train.grad_checkpointing:
                enable_grad_checkpointing(prepared.model.language)
        else:
            model = apply_tuning(prepared.model, cfg.tune)
            if cfg.train.grad_checkpointing:
                enable_grad_checkpointing(model)
        d, processor = prepared.data, prepared.processor
        if cfg.data.packing:
            from visiontune.vlm.packed_attention import use_packed_attention
            from visiontune.vlm.packing import PackedPairCollator, rope_index_of

            collator = PackedPairCollator(processor, cfg.data.max_image_pixels, rope_index_of(model))
            use_packed_attention(model)  # SDPA per record, not over the whole row
        else:
            collator = PairCollator(processor, cfg.data.max_image_pixels)
        train, val = PairDataset(d.train_tokens, d.train), PairDataset(d.val_tokens, d.val)
        mode = reference_mode(cfg, model)
        if mode == "precomputed":
            set_reference(cfg, model, collator, {"train": train, "val": val})
        generation = GenerationEval(processor, [p.chosen for p in d.val], cfg.eval, cfg.data.max_image_pixels)
        prompts = [p.chosen for p in d.train + d.val]  # a pair's images are its prompt's, on both answers
        keep_ranks_in_step(model, processor, cfg.data.max_image_pixels, prompts)  # mixed_batches.py
        return Fit(
            model=model,
            train_dataset=train,
            eval_dataset=val,
            collator=collator,
            trainer_class=full_tuning_trainer() if cfg.init_from and cfg.tune.method == "full" else PreferenceTrainer,
            trainer_attrs={
                "collator_stats": collator,
                "generation": generation,
                "loss_settings": loss_settings(cfg.loss),
                "mode": mode,
            },
            items="pair",
            workers=cfg.data.workers,
        )

    def evaluate_run(self, cfg: VlmPreferenceConfig, fit: Fit, trainer: Any, prepared: Any, name: str) -> dict:
        return evaluate_vlm(trainer, name)

    def save(self, cfg: Any, fit: Fit, trainer: Any, prepared: Any, run_dir: Path, after: dict) -> dict:
        """vlm_sft's export (adapter/ or model/; an assembled VLM: model/, merged), plus the reward and margin curves
        for the report."""
        from visiontune.vlm.preference_report import add_reward_section

        if cfg.init_from:
            from visiontune.vlm.preference_assembled import save_assembled

            extras = save_assembled(trainer.model, prepared.processor, run_dir)
        else:
            extras = super().save(cfg, fit, trainer, prepared, run_dir, after)
        add_reward_section(run_dir)
        return extras


def prepare_preferences(cfg: VlmPreferenceConfig, processor: Any) -> PreferenceData:
    """Read and check the pairs (bad ones named, or skipped and counted), split off validation, tokenise both
    answers of each pair (cached), and keep the pairs whose both answers fit data.max_length whole."""
    d = cfg.data

    def read(spec: str) -> list[PreferencePair]:
        return read_preferences(spec, image_root=d.image_root, dataset_name=d.dataset_name)

    if d.val:
        splits = {"train": read(d.train), "val": read(d.val)}
    else:
        splits = {"train": read(d.train)}
    by_conv = {id(p.chosen): p for pairs in splits.values() for p in pairs}
    kept, bad = check_conversation_splits({k: [p.chosen for p in v] for k, v in splits.items()}, d.on_bad_sample)
    if d.val:
        refuse_conversation_leak(kept["train"], kept["val"])
        train_c, val_c = kept["train"], kept["val"]
    else:
        train_c, val_c = _split(kept["train"], d.val_split, cfg.seed)
    train, val = [by_conv[id(c)] for c in train_c], [by_conv[id(c)] for c in val_c]
    train_tokens, bad_train = _tokenize_pairs(cfg, processor, train)
    if not train_tokens:
        raise DataError(f"No pair of {d.train} fits for training (first problem: {bad_train[0][0]} {bad_train[0][1]}).")
    val_tokens, bad_val = _tokenize_pairs(cfg, processor, val) if val else ([], [])
    return PreferenceData(train, val, train_tokens, val_tokens, bad + bad_train + bad_val)


def _tokenize_pairs(
    cfg: VlmPreferenceConfig, processor: Any, pairs: list[PreferencePair]
) -> tuple[list[TokenizedPair], list[tuple[str, str]]]:
    """Both answers with assistant-only labels, then only the last answer labelled (the one the pair compares)."""
    d = cfg.data
    settings = {
        "max_length": d.max_length,
        "max_image_pixels": d.max_image_pixels,
        "train_on": "assistant",
        "on_bad_sample": d.on_bad_sample,
        "cache": d.cache,
    }
    sides = [
        tokenize_cached(processor, [getattr(p, side) for p in pairs], cfg.model_name(), **settings)
        for side in ("chosen", "rejected")
    ]
    (chosen, bad_c), (rejected, bad_r) = sides
    by_index = {r.index: r for r in rejected}
    kept, bad = [], [*bad_c, *((ref, f"(rejected answer) {why}") for ref, why in bad_r)]
    for c in chosen:
        r = by_index.get(c.index)
        if r is None:
            continue
        if c.cut or r.cut:
            why = (
                f"is longer than data.max_length={d.max_length} tokens with its {'chosen' if c.cut else 'rejected'} "
                "answer (a preference compares whole answers; raise data.max_length or shorten the prompt)"
            )
            if d.on_bad_sample == "error":
                raise DataError(f"{pairs[c.index].ref} {why}; or set data.on_bad_sample=skip to drop such pairs.")
            bad.append((pairs[c.index].ref, why))
            continue
        kept.append(TokenizedPair(last_answer(c), last_answer(r), c.index))
    return kept, bad


def last_answer(record: Tokenized) -> Tokenized:
    """The record with labels on its last assistant answer only: earlier answers are prompt for a preference."""
    from visiontune.vlm.tokenize import IGNORE

    labels = list(record.labels)
    end = max(i for i, t in enumerate(labels) if t != IGNORE)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    masked = [IGNORE] * start + labels[start : end + 1] + [IGNORE] * (len(labels) - end - 1)
    return Tokenized(record.input_ids, masked, record.extra, record.ref, record.index)


class PreferenceTrainer(VlmTrainer):
    """The loss and TRL's reward metrics on [chosen; rejected] batches. Metrics are averaged over the steps since
    the last log (training) or over the validation set, and logged as `rewards/chosen`, ..., `eval_rewards/...`."""

    loss_settings: dict[str, Any] = {}  # preference_loss's keywords (loss_settings of the recipe's `loss`)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The loss is a mean over the pairs of one micro-batch, not a sum over tokens the model normalises by
        # `num_items_in_batch`: Trainer must divide it by the accumulation steps (else train.grad_accum scales it).
        self.model_accepts_loss_kwargs = False

    mode: str = "adapters_off"  # or "precomputed" (batches carry ref_logps) or "none" (SimPO)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, ref = inputs.pop("labels"), inputs.pop("ref_logps", None)
        unwrapped = self.accelerator.unwrap_model(model)
        policy = answer_logps(model, inputs, labels, unwrapped)
        if self.mode == "adapters_off":
            ref = self.reference_logps(model, inputs, labels)
        chosen_ref, rejected_ref = ref.chunk(2) if ref is not None else (None, None)
        loss, metrics = preference_loss(policy, chosen_ref, rejected_ref, **self.loss_settings)
        self.keep_metrics("train" if model.training else "eval", metrics)
        return (loss, None) if return_outputs else loss

    def reference_logps(self, model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """The frozen start: the same model with its LoRA adapters off (no second copy in memory)."""
        peft_model = self.accelerator.unwrap_model(model)
        with torch.no_grad(), peft_model.disable_adapter():
            return answer_logps(model, inputs, labels, peft_model).logps

    def keep_metrics(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        store = self.__dict__.setdefault("_pair_metrics", {"train": defaultdict(list), "eval": defaultdict(list)})
        for key, values in metrics.items():
            store[mode][key].append(self.accelerator.gather_for_metrics(values.detach()).float().mean().item())

    def averaged(self, mode: str) -> dict[str, float]:
        """The means of what `keep_metrics` kept for `mode` since the last call, which starts a new window."""
        store = self.__dict__.get("_pair_metrics", {}).get(mode, {})
        means = {k: sum(v) / len(v) for k, v in store.items() if v}
        store.clear()
        return means

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self.averaged("eval")
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.averaged("eval").items()})
        return output

    def records(self, inputs: dict) -> int:
        return super().records(inputs) // 2  # pairs: a chosen and a rejected record each

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update({k: round(v, 6) for k, v in self.averaged("train").items()})
        super().log(logs, *args, **kwargs)
