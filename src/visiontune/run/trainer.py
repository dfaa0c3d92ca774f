"""Glue on the transformers `Trainer`. What we add that Trainer lacks: atomic checkpoints (written to
`.partial/` then renamed into place) and a per-rank record of the samples each process trained on."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints


class VisiontuneTrainer(Trainer):
    samples_seen = 0
    batch_mixer = None  # mixup/cutmix, applied to training batches only (the collator also serves evaluation)
    make_optimizer = None  # model -> optimiser (ours: parameter groups Trainer cannot express; see run/optim.py)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.make_optimizer is not None:
            self.optimizer = self.make_optimizer(self.model if model is None else model)
            return self.optimizer
        return super().create_optimizer(model)

    def train(self, *args, **kwargs):
        forget_evaluation_prepare(self)
        return super().train(*args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """accelerate loads an FSDP2 optimiser with torch's strict default, which refuses a trainable parameter the
        checkpoint has no optimiser state for; torch's own `Optimizer.load_state_dict` (DDP) accepts it. It is the
        usual case with tune.method: gradual_unfreeze: parameters a schedule keeps frozen never got state, and on
        resume they are frozen again only when the epoch begins, after this load. So the load is made non-strict."""
        if checkpoint is None or not self.is_fsdp_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        import dataclasses

        import accelerate.utils.fsdp_utils as fsdp_utils

        strict = fsdp_utils._prepare_sd_options  # private: accelerate takes no options for this load
        fsdp_utils._prepare_sd_options = lambda plugin: dataclasses.replace(strict(plugin), strict=False)
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            fsdp_utils._prepare_sd_options = strict

    def evaluate(self, *args, **kwargs):
        with fsdp2_gathered(self):
            return super().evaluate(*args, **kwargs)

    def get_train_dataloader(self):
        return _own_generator(super().get_train_dataloader(), self.args.seed)

    def get_eval_dataloader(self, eval_dataset=None):
        return _own_generator(super().get_eval_dataloader(eval_dataset), self.args.seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.samples_seen += int(inputs["pixel_values" if "pixel_values" in inputs else "input_ids"].shape[0])
        if self.batch_mixer is not None and inputs["labels"].ndim == 1:
            inputs["pixel_values"], inputs["labels"] = self.batch_mixer(inputs["pixel_values"], inputs["labels"])
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Trainer lacks: an evaluation of the same weights on the same data is not run again. The "after"
        evaluation (and the trained-weights side of the EMA comparison) usually follows a validation of the very
        weights training ended with; its results are reused, renamed to the new prefix."""
        if (self.is_deepspeed_enabled and self.deepspeed is None) or (self.is_fsdp_enabled and not fsdp2_sharded(self)):
            return self._evaluate_before_sharding(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        key = evaluation_key(self, dataloader, prediction_loss_only, ignore_keys)
        kept = next((e for e in (self._last_evaluation, self._best_evaluation) if e is not None and e[0] == key), None)
        if every_rank(key is not None and kept is not None):
            if kept[3]:
                vars(self.compute_metrics).update(kept[3])  # the full report tasks read after evaluate (`.last`)
            return renamed(kept[2], kept[1], metric_key_prefix)
        output = self.run_evaluation(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        state = dict(vars(self.compute_metrics)) if hasattr(self.compute_metrics, "__dict__") else {}
        self._last_evaluation = (key, metric_key_prefix, output, state) if key is not None else None
        return output

    # (key, metric prefix, EvalLoopOutput, compute_metrics' attributes) of the last evaluation loop, and of the one
    # that set the best metric (load_best_model_at_end brings its weights back)
    _last_evaluation = None
    _best_evaluation = None

    def _determine_best_metric(self, metrics, trial):
        new_best = super()._determine_best_metric(metrics, trial)
        if new_best:
            self._best_evaluation = self._last_evaluation
        return new_best

    def _evaluate_before_sharding(self, *args):
        """Trainer lacks: an evaluation before `train()` under DeepSpeed or FSDP2. Trainer would build an
        inference-only DeepSpeed engine (refused under ZeRO-2; under ZeRO-3 `train()` then finds the model wrapped and
        never builds the training engine, failing at the first backward), or have accelerate shard the model without
        its optimiser (refused under FSDP2). Before training every rank still holds the whole model (it is built
        before the DeepSpeed config exists; FSDP2 shards it in `train()`), so the evaluation runs as plain
        data-parallel evaluation and the model is left unprepared for `train()` to wrap."""
        flag = "is_deepspeed_enabled" if self.is_deepspeed_enabled else "is_fsdp_enabled"
        setattr(self, flag, False)
        try:
            return self.run_evaluation(*args)
        finally:
            setattr(self, flag, True)
            model = self.model
            self.model_wrapped = model
            if getattr(model, "_is_accelerate_prepared", False):
                del model._is_accelerate_prepared
            self.accelerator._models = [m for m in self.accelerator._models if m is not model]

    def run_evaluation(self, dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix):
        """The pass over the validation set itself (Trainer's loop); a task with its own loop overrides this, not
        `evaluation_loop`, so its evaluations are reused too."""
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint under `.partial/`, fsync it, then move it into place with one atomic rename, so a
        kill, power cut or full disk mid-save leaves the previous checkpoint as the newest complete one."""
        from visiontune.run.folder import PARTIAL, publish, save_error

        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, PARTIAL)
        staging, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staging):
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        try:
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
                publish(Path(staging), Path(final))
        except Exception as err:
            error = save_error(Path(run_dir), name, err)  # before the cleanup below frees the space
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # a torn save only holds disk space
            if error is None:
                raise
            raise error from err
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def record_rank(self, run_dir: Path) -> dict:
        """Write `ranks/rank{R}.json`: samples trained on and a weight checksum (DDP ranks must agree). Under ZeRO-3
        call it inside `full_weights` (every rank), else a rank sums its shard only."""
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


@contextlib.contextmanager
def full_weights(trainer: Trainer) -> Iterator[None]:
    """Every rank holds the whole model inside (collective: all ranks enter it). Under ZeRO-3 and FSDP2 a rank holds
    a shard of each parameter; the exports, the rank record and anything else reading weights outside a forward need
    them whole. Elsewhere the weights are whole already."""
    if trainer.is_fsdp_enabled:
        with fsdp2_unsharded(trainer.model):
            yield
        return
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(trainer.model.parameters()), modifier_rank=None):
        yield


def fsdp2_sharded(trainer: Trainer) -> bool:
    """Whether `train()` has sharded the model with FSDP2 (`fully_shard` turns the module into an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(trainer.model, FSDPModule)


@contextlib.contextmanager
def fsdp2_gathered(trainer: Trainer) -> Iterator[None]:
    """FSDP2 gathers a module's parameters in that module's forward hooks only, so an evaluation that calls other
    methods or submodules (segment's logits, a VLM's generate) would meet shards. Inside (collective: every rank
    evaluates), each FSDP2 module holds its whole parameters and keeps them through forwards (torch's
    `set_reshard_after_forward(False)`, its documented use for evaluations); after, the shards are back. A no-op
    unless `train()` has sharded the model."""
    from torch.distributed.fsdp import FSDPModule

    model = trainer.model
    if not (trainer.is_fsdp_enabled and fsdp2_sharded(trainer)):
        yield
        return
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # what each unit does after a forward: accelerate chose it per unit (the root and the head keep their parameters)
    # and torch has a setter but no getter, so its private record is kept and put back
    states = {id(s): s for s in (m._get_fsdp_state() for m in sharded)}.values()
    saved = [
        (s, s._auto_reshard_after_forward, [g.post_forward_mesh_info for g in s._fsdp_param_groups]) for s in states
    ]
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
        for state, auto, infos in saved:
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos, strict=True):
                group.post_forward_mesh_info = info


@contextlib.contextmanager
def fsdp2_unsharded(model) -> Iterator[None]:
    """FSDP2 (`fully_shard`) modules hold DTensor shards, and their `state_dict()` returns shards even after
    `unshard()` (its hook reshards first), so library saves would write shards. Inside, each sharded parameter is
    swapped for a plain one holding the whole tensor (gathered: collective, every rank the same order; a tied
    parameter stays tied), and the shards are put back after."""
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in model.modules():  # shard_grad_op leaves parameters gathered after an evaluation forward
        if isinstance(module, FSDPModule):
            module.reshard()
    whole: dict[int, torch.nn.Parameter] = {}
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                if id(param) not in whole:
                    whole[id(param)] = torch.nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
                module._parameters[name] = whole[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def forget_evaluation_prepare(trainer: Trainer) -> None:
    """Trainer lacks: an `evaluate()` before `train()` (our "before" evaluation, a stage's validation) has accelerate
    prepare the bare model in evaluation mode, which marks it prepared without wrapping it in DDP; `train()` then
    takes the mark at its word and trains each rank on its own gradients (no all-reduce, the ranks' weights part
    at the first step). So before training, a model only ever prepared for evaluation is made unprepared again."""
    model, accelerator = trainer.model, trainer.accelerator
    if (
        accelerator.num_processes == 1
        or trainer.is_deepspeed_enabled
        or trainer.is_fsdp_enabled
        or trainer.model_wrapped is not model  # already wrapped by an earlier train(): nothing to redo
        or not getattr(model, "_is_accelerate_prepared", False)
    ):
        return
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # takes off the mixed-precision forward it added
    del model._is_accelerate_prepared
    accelerator._models = [m for m in accelerator._models if m is not model]


def _own_generator(loader, seed: int):
    """Each new loader iterator draws its workers' base seed from the loader's `generator`, by default the global
    RNG. With persistent workers an uninterrupted run draws once per loader, a resumed run again for its fresh
    loaders, which shifts every random number after (mixup, dropout, sampling) and makes resumed != uninterrupted.
    So the draw goes to a generator of the loader's own. (Per-sample randomness in workers is seeded by the datasets
    themselves, e.g. core.dataset.EpochSeed, not by this seed.)"""
    import torch

    getattr(loader, "base_dataloader", loader).generator = torch.Generator().manual_seed(seed)
    return loader


def weights_digest(model) -> str | None:
    """A digest of what training can change: the trainable parameters (names and bytes) and every buffer (BatchNorm
    statistics). None where the weights are not all here (meta tensors)."""
    import hashlib

    import torch

    digest = hashlib.blake2b(digest_size=16)
    tensors = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + list(model.named_buffers())
    for name, tensor in tensors:
        if tensor.is_meta:
            return None
        digest.update(name.encode())
        data = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def evaluation_key(trainer, dataloader, prediction_loss_only, ignore_keys) -> tuple | None:
    """What decides an evaluation's result: the weights, the dataset object, what is computed. None (never
    reused) under DeepSpeed/FSDP, where a rank holds a shard of the weights only."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return None
    digest = weights_digest(trainer.accelerator.unwrap_model(trainer.model))
    if digest is None:
        return None
    dataset = getattr(dataloader, "dataset", None)
    return (
        digest,
        id(dataset),
        len(dataset) if dataset is not None else None,
        prediction_loss_only,
        tuple(ignore_keys or ()),
        id(trainer.compute_metrics),
    )


def every_rank(flag: bool) -> bool:
    """`flag` on every process (one rank skipping an evaluation the others run would leave them waiting on its
    gather); the flag itself when there is one process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def renamed(output, old: str, new: str):
    from transformers.trainer_utils import EvalLoopOutput

    metrics = {(f"{new}_{k[len(old) + 1 :]}" if k.startswith(f"{old}_") else k): v for k, v in output.metrics.items()}
    return EvalLoopOutput(output.predictions, output.label_ids, metrics, output.num_samples)
