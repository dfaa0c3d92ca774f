"""Evaluation for tasks whose predictions the Trainer cannot concatenate (boxes per image, masks of each image's own
size): the model runs over the (rank-sharded) eval loader into per-item records, every rank's records are gathered,
and `compute_metrics` scores them. The Trainer's `evaluate` then logs, selects the best checkpoint and stops early on
what it returns, as for any task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.trainer_utils import EvalLoopOutput

from visiontune.run.trainer import VisiontuneTrainer


def collect_records(model: Any, loader: Any, prepare: Callable | None, per_batch: Callable[[Any], list]) -> list:
    """`per_batch(batch)`'s records for every batch of `loader`, the model in eval mode without gradients; `prepare`
    puts a batch where the model is (the Trainer's `_prepare_inputs`; default: every tensor to the model's device)."""
    import torch
    from accelerate.utils import send_to_device

    model.eval()
    device = next(model.parameters()).device
    prepare = prepare or (lambda batch: send_to_device(batch, device))
    records: list = []
    with torch.no_grad():
        for batch in loader:
            records += per_batch(prepare(batch))
    return records


class RecordsTrainer(VisiontuneTrainer):
    """`collect(model, loader, prepare) -> list[dict]` makes the records (set by the task's subclass); a rank-sharded
    loader repeats items in its last batch, so `compute_metrics` keeps one record per item."""

    @staticmethod
    def collect(model: Any, loader: Any, prepare: Callable) -> list[dict]:
        raise NotImplementedError

    def run_evaluation(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ) -> EvalLoopOutput:
        self.callback_handler.eval_dataloader = dataloader
        records = self.collect(self.model, dataloader, self._prepare_inputs)
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            records = gather_object(records)
        scores = self.compute_metrics(records)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(records))
