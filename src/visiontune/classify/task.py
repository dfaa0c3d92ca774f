"""`task: classify` — fine-tune an image classifier (timm / transformers / built-in backbones).

Reads top to bottom: data -> model -> tuning plan -> Trainer -> evaluate before -> train -> evaluate after ->
save model -> report.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from visiontune.classify.config import ClassifyConfig
from visiontune.classify.freeze import GradualUnfreeze, set_trainable
from visiontune.classify.layers import layer_groups
from visiontune.classify.lora import apply_lora
from visiontune.classify.metrics import ClassificationMetrics, classification_report
from visiontune.classify.model import ImageClassifier
from visiontune.classify.resolve import resolve_classifier
from visiontune.core.check import BadSample, clean
from visiontune.core.dataset import Collator, ImageClassificationDataset, stratified_split
from visiontune.core.errors import DataError
from visiontune.core.images import open_image
from visiontune.core.readers import LabeledImages, read_dataset
from visiontune.core.transforms import Preprocess, batch_mixer, eval_transform, train_transform
from visiontune.recipe import dump_config
from visiontune.run.callbacks import MetricsJsonl, RichProgress, WeightEma
from visiontune.run.distributed import check_process_group, is_main_process, launched_world_size
from visiontune.run.folder import last_checkpoint, prepare_run_dir
from visiontune.run.optim import build_optimizer, layer_decay_scales
from visiontune.run.trainer import VisiontuneTrainer, training_arguments


@dataclass
class SplitData:
    train: LabeledImages
    val: LabeledImages
    skipped: list[BadSample] = field(default_factory=list)


@dataclass
class TuningPlan:
    callbacks: list[TrainerCallback] = field(default_factory=list)
    include: set[str] | None = None  # parameters given to the optimiser (None: those with requires_grad)
    layer_scales: dict[str, float] | None = None
    ema: WeightEma | None = None


class ClassifyTask:
    reads_own_classes = False  # evaluate(): data labels map onto the model's saved classes

    def train(self, cfg: ClassifyConfig, overwrite: bool = False, resume: bool = False) -> Path:
        start = time.perf_counter()
        run_dir = Path(cfg.output_dir)
        resume = resume or cfg.train.resume
        if is_main_process():
            checkpoint = prepare_run_dir(run_dir, overwrite, resume)
            dump_config(cfg, run_dir / "config.yaml")
        else:
            checkpoint = last_checkpoint(run_dir) if resume else None
        data = load_split(cfg)
        model = self.build_model(cfg, data.train.class_names)
        plan = self.plan_tuning(model, cfg)
        trainer = build_trainer(model, cfg, data, plan, run_dir)
        if checkpoint is None:
            _write_eval(run_dir, "before", trainer, "before")
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            for callback in trainer.callback_handler.callbacks:
                if isinstance(callback, RichProgress):
                    callback.stop()
        weights = _keep_better_ema(trainer, plan.ema, cfg.train.metric)
        after = _write_eval(run_dir, "after", trainer, "after", weights=weights)
        trainer.record_rank(run_dir)
        if is_main_process():
            _save_outputs(model, trainer, data, run_dir, after, time.perf_counter() - start)
        return run_dir

    def build_model(self, cfg: ClassifyConfig, class_names: list[str]) -> ImageClassifier:
        model = resolve_classifier(cfg.model, class_names, cfg.pretrained)
        model.preprocess = _with_size(model.preprocess, cfg.data.image_size)
        return model

    def plan_tuning(self, model: ImageClassifier, cfg: ClassifyConfig) -> TuningPlan:
        return plan_tuning(model, cfg)

    def load_model(self, name: str, class_names: list[str] | None = None) -> ImageClassifier:
        """A trained model for eval/predict (`class_names` only matters for tasks whose head is built from text)."""
        return resolve_classifier(name)

    def evaluate(
        self,
        model: str,
        data: str,
        out_dir: Path | None = None,
        batch_size: int = 64,
        workers: int = 2,
        on_bad_sample: str = "error",
    ) -> dict:
        if self.reads_own_classes:  # zero-shot style heads are built from the data's class names
            dataset = read_dataset(data)
            clf = self.load_model(model, dataset.class_names)
        else:
            clf = self.load_model(model)
            dataset = read_dataset(data, class_names=clf.class_names)
        images, skipped = clean(dataset, on_bad_sample, 89_478_485, "eval")
        report = self.evaluate_loaded(clf, images, out_dir, batch_size, workers)
        report["skipped_samples"] = [{"ref": b.ref, "reason": b.reason} for b in skipped]
        if out_dir is not None:
            (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
        return report

    def evaluate_loaded(
        self,
        clf: torch.nn.Module,
        images: LabeledImages,
        out_dir: Path | None = None,
        batch_size: int = 64,
        workers: int = 0,
    ) -> dict:
        """Metrics (and predictions.csv in out_dir) of an in-memory model on checked data."""
        clf.eval()
        ds = ImageClassificationDataset(images, eval_transform(clf.preprocess), 89_478_485)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=Collator())
        with torch.inference_mode():
            logits = torch.cat([clf(batch["pixel_values"])["logits"] for batch in loader])
        report = classification_report(logits, torch.tensor(images.labels), clf.class_names)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_predictions(out_dir / "predictions.csv", images, logits, clf.class_names)
        return report

    def predict(self, model: str, inputs: list[str], top_k: int = 5) -> list[dict]:
        clf = self.load_model(model).eval()
        transform = eval_transform(clf.preprocess)
        results = []
        for path in inputs:
            try:
                image = open_image(path, 89_478_485)
            except Exception as err:
                raise DataError(f"{path} {err}; give a readable image file.") from None
            with torch.inference_mode():
                probs = clf(transform(image)[None])["logits"].float().softmax(-1)[0]
            top = probs.topk(min(top_k, len(probs)))
            results.append(
                {
                    "input": path,
                    "top": [
                        (clf.class_names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                    ],
                }
            )
        return results


def load_split(cfg: ClassifyConfig) -> SplitData:
    """Read train (and val, or a seeded stratified split), then check every sample once."""
    d = cfg.data
    train = read_dataset(d.train, d.class_names, d.image_column, d.label_column, split="train")
    if d.val:
        val = read_dataset(d.val, train.class_names, d.image_column, d.label_column, split="validation")
    else:
        train, val = stratified_split(train, d.val_split, cfg.seed)
    train, bad_train = clean(train, d.on_bad_sample, d.max_image_pixels, "train")
    val, bad_val = clean(val, d.on_bad_sample, d.max_image_pixels, "val")
    return SplitData(train, val, bad_train + bad_val)


def plan_tuning(model: ImageClassifier, cfg: ClassifyConfig) -> TuningPlan:
    """Freeze / unfreeze / LoRA / layer decay / EMA, as the recipe's `tune` and `train` sections ask."""
    tune, plan = cfg.tune, TuningPlan()
    model.label_smoothing = cfg.train.label_smoothing
    if cfg.train.grad_checkpointing and not model.enable_grad_checkpointing():
        print(f"note: {cfg.model} does not support gradient checkpointing; training without it")
    if tune.method == "lora":
        apply_lora(model, tune.lora)
    else:
        groups, head = layer_groups(model)
        if tune.method == "linear_probe":
            set_trainable(model, set(head))
        elif tune.method == "gradual_unfreeze":
            distributed = launched_world_size() > 1
            plan.callbacks.append(GradualUnfreeze(model, groups, head, tune.unfreeze, distributed))
            plan.include = {n for n, _ in model.named_parameters()}
        if tune.layer_decay is not None:
            plan.layer_scales = layer_decay_scales(groups, head, tune.layer_decay)
    if cfg.train.ema is not None:
        plan.ema = WeightEma(model, cfg.train.ema.decay)
        plan.callbacks.append(plan.ema)
    return plan


def build_trainer(
    model: ImageClassifier, cfg: ClassifyConfig, data: SplitData, plan: TuningPlan, run_dir: Path
) -> VisiontuneTrainer:
    report_to = _setup_wandb(cfg, run_dir)
    args = training_arguments(
        cfg.train,
        run_dir,
        cfg.seed,
        _workers(cfg.data.workers, data.train),
        report_to,
        greater_is_better="loss" not in cfg.train.metric,
    )
    check_process_group(args.world_size)
    pre, aug = model.preprocess, cfg.data.augment
    trainer = VisiontuneTrainer(
        model=model,
        args=args,
        train_dataset=ImageClassificationDataset(
            data.train, train_transform(pre, aug), cfg.data.max_image_pixels, draft_size=pre.image_size
        ),
        eval_dataset=ImageClassificationDataset(
            data.val, eval_transform(pre), cfg.data.max_image_pixels, draft_size=pre.image_size
        ),
        data_collator=Collator(),
        compute_metrics=ClassificationMetrics(data.train.class_names),
        optimizers=(build_optimizer(model, cfg.train, plan.include, plan.layer_scales), None),
        callbacks=_callbacks(
            cfg, plan, run_dir, images_per_step=cfg.train.batch_size * cfg.train.grad_accum * args.world_size
        ),
    )
    trainer.batch_mixer = batch_mixer(aug, len(data.train.class_names))
    trainer.remove_callback(PrinterCallback)
    return trainer


def _callbacks(cfg: ClassifyConfig, plan: TuningPlan, run_dir: Path, images_per_step: int) -> list[TrainerCallback]:
    callbacks: list[TrainerCallback] = [RichProgress(images_per_step), MetricsJsonl(run_dir / "metrics.jsonl")]
    if cfg.track.tensorboard and is_main_process():
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(run_dir / "tb")  # it reopens its writer after train end; keep one folder
        callbacks.append(tensorboard)
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience))
    return callbacks + plan.callbacks


def _setup_wandb(cfg: ClassifyConfig, run_dir: Path) -> list[str]:
    if not cfg.track.wandb:
        return []
    import os

    os.environ.setdefault("WANDB_PROJECT", cfg.track.wandb_project)
    os.environ["WANDB_MODE"] = cfg.track.wandb_mode
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    return ["wandb"]


def _write_eval(run_dir: Path, name: str, trainer: VisiontuneTrainer, prefix: str, **extra: str) -> dict:
    trainer.evaluate(metric_key_prefix=prefix)
    report = {**trainer.compute_metrics.last, **extra}
    if is_main_process():
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / f"{name}.json").write_text(json.dumps(report, indent=2))
    return report


def _keep_better_ema(trainer: VisiontuneTrainer, ema: WeightEma | None, metric: str) -> str:
    """With EMA on, evaluate the averaged weights too and keep whichever scores better on validation."""
    if ema is None:
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


def _save_outputs(
    model: ImageClassifier, trainer: VisiontuneTrainer, data: SplitData, run_dir: Path, after: dict, wall_time: float
) -> None:
    from visiontune.report import write_report

    model.save(run_dir / "model", adapter_dir=run_dir / "adapter")
    summary = {
        "wall_time_s": round(wall_time, 1),
        "train_samples": len(data.train),
        "val_samples": len(data.val),
        "skipped_samples": [{"ref": b.ref, "reason": b.reason} for b in data.skipped],
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "global_step": trainer.state.global_step,
        "final_metrics": after["metrics"],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_predictions(
        run_dir / "eval" / "predictions.csv", data.val, trainer.compute_metrics.last_logits, data.train.class_names
    )
    write_report(run_dir)


def _write_predictions(path: Path, images: LabeledImages, logits: torch.Tensor, names: list[str]) -> None:
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "label", "predicted", "confidence"])
        for i in range(len(images)):
            writer.writerow([images.ref(i), names[images.labels[i]], names[int(pred[i])], f"{float(conf[i]):.4f}"])


def _workers(setting: int | str, data: LabeledImages) -> int:
    if setting != "auto":
        return int(setting)
    import os

    return 0 if data.kind == "array" else min(4, os.cpu_count() or 1)


def _with_size(pre: Preprocess, size: int | None) -> Preprocess:
    return pre if size is None else Preprocess(size, pre.mean, pre.std, pre.interpolation)
