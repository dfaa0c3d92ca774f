"""The recipe's `train` section as transformers `TrainingArguments`: the one place train keys reach the loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from visiontune.run.config import TrainConfig, deepspeed_file, gpu_training
from visiontune.run.distributed import launched_world_size
from visiontune.run.folder import CHECKPOINTS
from visiontune.run.optim import TRAINER_OPTIM


def check_deepspeed(cfg: TrainConfig) -> None:
    """What `train.deepspeed` needs besides its file, and `train.fsdp` on CPU; the runner asks before it creates the run
    folder."""
    import importlib.util

    from visiontune.core.errors import RecipeError

    # one CPU process has no process group for FSDP2 to shard over (fsdp_on_cpu below)
    if cfg.fsdp and launched_world_size() == 1 and not gpu_training(cfg.cpu):
        raise RecipeError(
            "train.fsdp on CPU needs several ranks: launch with `visiontune train RECIPE --nproc 2` (or more), or "
            "remove train.fsdp."
        )
    if not cfg.deepspeed:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(
            "train.deepspeed needs the deepspeed package: `pip install 'visiontune[deepspeed]'` (pip install "
            "deepspeed==0.19.8), or remove it."
        )
    # one CPU process has no process group for DeepSpeed to shard over; transformers would run without it
    if launched_world_size() == 1 and not gpu_training(cfg.cpu):
        raise RecipeError(
            "train.deepspeed on CPU needs several ranks: launch with `visiontune train RECIPE --nproc 2` (or more), "
            "or remove train.deepspeed."
        )


def training_arguments(
    cfg: TrainConfig,
    run_dir: Path,
    seed: int,
    workers: int,
    report_to: list[str],
    validate: bool = True,
    **overrides: Any,
) -> TrainingArguments:
    """`validate`: evaluate (and keep the best checkpoint by `cfg.metric`) every epoch or every `eval_steps`.
    `overrides`: arguments a task must set itself (e.g. `dataloader_drop_last` for contrastive batches)."""
    check_deepspeed(cfg)
    use_cpu = cfg.cpu if cfg.cpu is not None else not torch.cuda.is_available()
    if cfg.deepspeed and use_cpu:
        overrides = {**deepspeed_on_cpu(), **overrides}
        use_cpu = False  # use_cpu=True would take transformers past its DeepSpeed set-up: plain DDP, silently
    per_epoch = cfg.eval_steps is None
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        # twice the training batch fills a GPU better (no activations kept for backward); on CPU the bigger batch
        # only falls out of cache: the quickstart validation took ~40 % more CPU at 128 than at 64 (one thread)
        per_device_eval_batch_size=cfg.batch_size * (1 if use_cpu else 2),
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
        warmup_steps=cfg.warmup_ratio,
        eval_strategy=("epoch" if per_epoch else "steps") if validate else "no",
        save_strategy="epoch" if per_epoch else "steps",
        eval_steps=cfg.eval_steps,
        save_steps=cfg.eval_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=validate,
        metric_for_best_model=cfg.metric if validate else None,
        greater_is_better="loss" not in cfg.metric,
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
        deepspeed=str(deepspeed_file(cfg.deepspeed)) if cfg.deepspeed else None,  # a name or a checked path
        fsdp=bool(cfg.fsdp),
        fsdp_config={"version": 2, "reshard_after_forward": cfg.fsdp == "full_shard"} if cfg.fsdp else None,
        # the Trainer's name for a bitsandbytes optimiser, for what reads the arguments; the optimiser itself is
        # run/optim.py's (parameter groups)
        optim=TRAINER_OPTIM.get(cfg.optimizer, "adamw_torch"),
        ddp_backend="gloo" if use_cpu and launched_world_size() > 1 else None,
    )
    kwargs.update(overrides)
    args = TrainingArguments(**kwargs)
    if cfg.fsdp and use_cpu:
        fsdp_on_cpu(args)
    return args


def deepspeed_on_cpu() -> dict[str, Any]:
    """What DeepSpeed needs to run on CPU ranks through transformers, which lacks it: with `use_cpu` transformers
    and accelerate set up plain gloo DDP and drop the DeepSpeed config without a word; without it accelerate asks
    DeepSpeed for the backend, gets none on a machine without GPUs and counts one process. So the process group
    state is made here, as DeepSpeed on gloo (accelerate's own launcher variable ACCELERATE_USE_DEEPSPEED), and
    transformers is told to use it. Returns the TrainingArguments that say so."""
    from accelerate import PartialState

    os.environ.pop("ACCELERATE_USE_CPU", None)  # `run_ranks` sets it for DDP ranks; it would force the DDP path
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read again when Trainer builds its Accelerator
    state = PartialState(backend="gloo")
    if state.distributed_type.name != "DEEPSPEED" and launched_world_size() > 1:
        from visiontune.core.errors import DistributedError

        raise DistributedError(
            f"accelerate set up {state.distributed_type.name} instead of DeepSpeed on these CPU ranks; "
            "run without train.deepspeed or report the accelerate version."
        )
    return {"accelerator_config": {"use_configured_state": True}}


def fsdp_on_cpu(args: TrainingArguments) -> None:
    """What FSDP2 needs to run on CPU ranks through transformers, which accelerate lacks: AcceleratorState turns a
    process group into FSDP only on GPU-like devices, and on gloo CPU ranks the Trainer would train plain DDP without
    a word. accelerate's FSDP2 path itself (fully_shard over the default mesh, torch.distributed.checkpoint for
    checkpoints) runs on gloo. So the accelerator state is made here, ahead of the Trainer, as FSDP over the gloo
    process group `args` set up, with the FSDP plugin the Trainer would build; the Trainer's Accelerator reuses it."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    partial = PartialState()  # made by `args` (use_cpu, gloo)
    if partial.distributed_type != DistributedType.MULTI_CPU:
        from visiontune.core.errors import DistributedError

        raise DistributedError(
            f"train.fsdp on CPU needs several ranks and accelerate set up {partial.distributed_type.name}; launch "
            "with `visiontune train RECIPE --nproc 2` (or more), or remove train.fsdp."
        )
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    # the plugins the Trainer's Accelerator passes (transformers Trainer._build_accelerator_args); it keeps these
    dynamo = TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
    state = AcceleratorState(
        mixed_precision=args.mixed_precision, cpu=True, dynamo_plugin=dynamo, fsdp_plugin=plugin, _from_accelerator=True
    )
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin


def loader_workers(setting: int | str, in_memory: bool) -> int:
    """`data.workers`; `auto`: none for in-memory arrays (workers would only copy them), else up to 4."""
    if setting != "auto":
        return int(setting)
    return 0 if in_memory else min(4, os.cpu_count() or 1)
