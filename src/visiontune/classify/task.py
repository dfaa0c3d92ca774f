"""`task: classify` — fine-tune an image classifier (timm / transformers / built-in backbones).

What is its own: labelled images (read and checked once), the classifier and its tuning plan (freeze, gradual
unfreeze, LoRA, layer decay), classification metrics, the exported model and predictions. The runner
(`visiontune.run.runner`) does the rest.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from visiontune.classify.config import ClassifyConfig
from visiontune.classify.freeze import GradualUnfreeze, set_trainable
from visiontune.classify.layers import layer_groups
from visiontune.classify.lora import apply_lora
from visiontune.classify.metrics import ClassificationMetrics, classification_report
from visiontune.classify.model import ImageClassifier
from visiontune.classify.resolve import resolve_classifier
from visiontune.core.check import BadSample, clean, clean_splits, say_left_out
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.core.dataset import (
    Collator,
    ImageClassificationDataset,
    SetEpoch,
    identify,
    refuse_empty_classes,
    refuse_leak,
    split_duplicates,
    stratified_split,
)
from visiontune.core.errors import DataError
from visiontune.core.identity import fingerprint
from visiontune.core.images import open_image
from visiontune.core.readers import LabeledImages, read_dataset
from visiontune.core.transforms import batch_mixer, eval_transform, train_transform, with_image_size
from visiontune.run.arguments import loader_workers
from visiontune.run.distributed import launched_world_size
from visiontune.run.optim import build_optimizer, layer_decay_scales
from visiontune.run.task import Fit, Skipped, Task
from visiontune.run.trainer import VisiontuneTrainer

MAX_PIXELS = PIL_MAX_PIXELS  # eval/predict of saved models


@dataclass
class SplitData:
    train: LabeledImages
    val: LabeledImages
    skipped: list[BadSample] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # image-folder files Pillow cannot read


@dataclass
class TuningPlan:
    callbacks: list[TrainerCallback] = field(default_factory=list)
    include: set[str] | None = None  # parameters given to the optimiser (None: those with requires_grad)
    layer_scales: dict[str, float] | None = None


class ClassifyTask(Task):
    name = "classify"
    reads_own_classes = False  # evaluate(): data labels map onto the model's saved classes

    def prepare(self, cfg: ClassifyConfig) -> SplitData:
        data = load_split(cfg)
        say_left_out(data.left_out)
        return data

    def findings(self, data: SplitData) -> dict:
        return split_findings(data)

    def skipped(self, data: SplitData) -> list[Skipped]:
        return [Skipped(b.ref, b.reason) for b in data.skipped]

    def sizes(self, data: SplitData) -> dict[str, int]:
        return {"train_samples": len(data.train), "val_samples": len(data.val)}

    def build(self, cfg: ClassifyConfig, data: SplitData, run_dir: Path) -> Fit:
        model = self.build_model(cfg, data.train.class_names)
        return classification_fit(model, cfg, data, self.plan_tuning(model, cfg))

    def evaluate_run(
        self, cfg: ClassifyConfig, fit: Fit, trainer: VisiontuneTrainer, data: SplitData, name: str
    ) -> dict:
        trainer.evaluate(metric_key_prefix=name)
        return dict(trainer.compute_metrics.last)

    def save(
        self, cfg: ClassifyConfig, fit: Fit, trainer: VisiontuneTrainer, data: SplitData, run_dir: Path, after: dict
    ) -> dict:
        fit.model.save(run_dir / "model", adapter_dir=run_dir / "adapter")
        names = data.train.class_names
        _write_predictions(run_dir / "eval" / "predictions.csv", data.val, trainer.compute_metrics.last_logits, names)
        return {}

    def build_model(self, cfg: ClassifyConfig, class_names: list[str]) -> ImageClassifier:
        model = resolve_classifier(cfg.model, class_names, cfg.pretrained)
        model.preprocess = with_image_size(model.preprocess, cfg.data.image_size)
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
            dataset = read_dataset(data, class_names=clf.class_names, names_from=f"the classes of {model}")
        images, skipped = clean(dataset, on_bad_sample, MAX_PIXELS, "eval")
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
        ds = ImageClassificationDataset(images, eval_transform(clf.preprocess), MAX_PIXELS)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=Collator())
        with torch.inference_mode():
            logits = torch.cat([clf(batch["pixel_values"])["logits"] for batch in loader])
        report = classification_report(logits, torch.tensor(images.labels), clf.class_names)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_predictions(out_dir / "predictions.csv", images, logits, clf.class_names)
        return report

    def predict(self, model: str, inputs: list[str], top_k: int = 5) -> list[dict]:
        return predict_images(self.load_model(model), inputs, top_k)


def predict_images(clf: torch.nn.Module, inputs: list[str], top_k: int = 5) -> list[dict]:
    """Top-k (label, probability) per image file, for any model with `preprocess`, `class_names` and logits (a
    classifier, a CLIP zero-shot head)."""
    clf = clf.eval()
    transform = eval_transform(clf.preprocess)
    results = []
    for path in inputs:
        try:
            image = open_image(path, MAX_PIXELS)
        except Exception as err:
            raise DataError(f"{path} {err}; give a readable image file.") from None
        with torch.inference_mode():
            probs = clf(transform(image)[None])["logits"].float().softmax(-1)[0]
        top = probs.topk(min(top_k, len(probs)))
        pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        results.append({"input": path, "top": [(clf.class_names[i], p) for p, i in pairs]})
    return results


def load_split(cfg: ClassifyConfig) -> SplitData:
    """Read train (and val, or a seeded stratified split that keeps every copy of an image on one side), check every
    sample once, then refuse validation images that are also training images and classes left with no image."""
    d = cfg.data
    train = read_dataset(d.train, d.class_names, d.image_column, d.label_column, split="train")
    left_out = list(train.left_out)
    if d.val:
        source = "data.class_names" if d.class_names else f"the training data's classes ({d.train})"
        val = read_dataset(d.val, train.class_names, d.image_column, d.label_column, "validation", source)
        left_out += val.left_out
        identify(train, val)  # both at once, so that keys compare across the two
    else:
        train, val = stratified_split(train, d.val_split, cfg.seed)
    kept, bad = clean_splits({"train": train, "val": val}, d.on_bad_sample, d.max_image_pixels)
    refuse_leak(kept["train"], kept["val"])
    refuse_empty_classes(kept["train"])
    return SplitData(kept["train"], kept["val"], bad, left_out)


def split_findings(data: SplitData) -> dict:
    """data_report.json: duplicates within each split, files left out, and the data's fingerprint (for resume)."""
    splits = {"train": data.train, "val": data.val}
    records = {role: (split.keys or [], split.labels) for role, split in splits.items()}
    return {
        "duplicates": split_duplicates(splits),
        "left_out": data.left_out,
        "data": fingerprint(records, data.train.class_names),
    }


def classification_fit(model: torch.nn.Module, cfg: ClassifyConfig, data: SplitData, plan: TuningPlan) -> Fit:
    """What the Trainer needs for a classifier (also CLIP's zero-shot-head classifier) on labelled images."""
    pre, aug, max_pixels, t = model.preprocess, cfg.data.augment, cfg.data.max_image_pixels, cfg.train
    augment = train_transform(pre, preset=aug.preset, hflip=aug.hflip, policy=aug.policy)
    mixer = batch_mixer(len(data.train.class_names), preset=aug.preset, mixup=aug.mixup, cutmix=aug.cutmix)
    train = ImageClassificationDataset(data.train, augment, max_pixels, pre.image_size, seed=cfg.seed)
    return Fit(
        model=model,
        train_dataset=train,
        eval_dataset=ImageClassificationDataset(data.val, eval_transform(pre), max_pixels, pre.image_size),
        collator=Collator(),
        compute_metrics=ClassificationMetrics(data.train.class_names),
        make_optimizer=lambda m: build_optimizer(
            m,
            lr=t.lr,
            weight_decay=t.weight_decay,
            optimizer=t.optimizer,
            momentum=t.momentum,
            include=plan.include,
            layer_scales=plan.layer_scales,
        ),
        callbacks=[*plan.callbacks, SetEpoch(train)],
        trainer_class=ClassifierTrainer,
        trainer_attrs={"batch_mixer": mixer, "drop_lone_batch": lone_last_batch(model, len(data.train), t.batch_size)},
        workers=loader_workers(cfg.data.workers, in_memory=data.train.kind == "array"),
    )


class ClassifierTrainer(VisiontuneTrainer):
    """Drops each epoch's last training batch when `drop_lone_batch` says so (`lone_last_batch`), never a batch of
    evaluation: Trainer's `dataloader_drop_last` serves both loaders, and would shrink the validation set."""

    drop_lone_batch = False

    def get_train_dataloader(self):
        drop = self.drop_lone_batch
        self.args.dataloader_drop_last = drop(self.args.per_device_train_batch_size) if callable(drop) else drop
        try:
            return super().get_train_dataloader()
        finally:
            self.args.dataloader_drop_last = False


def lone_last_batch(model: torch.nn.Module, samples: int, batch_size: int | str) -> bool | Callable[[int], bool]:
    """Whether to drop each epoch's last training batch: only when it would hold one sample and the model has
    BatchNorm, which cannot normalise a batch of one in training ("Expected more than 1 value per channel", at the
    end of the first epoch). The order is reshuffled every epoch, so a different sample sits out each time; models
    without BatchNorm keep every sample. Each process trains on ceil(samples / processes) samples."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    per_process = math.ceil(samples / launched_world_size())
    if per_process == 1:
        raise DataError(
            "The training data has one image per process, and the model's BatchNorm layers cannot train on a batch "
            "of one; add images (or train on fewer processes)."
        )
    if batch_size == "auto":  # chosen when the run starts (train.batch_size: auto): the trainer decides then
        return lambda batch: per_process % batch == 1
    return per_process % batch_size == 1


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
    return plan


def _write_predictions(path: Path, images: LabeledImages, logits: torch.Tensor, names: list[str]) -> None:
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "label", "predicted", "confidence"])
        for i in range(len(images)):
            writer.writerow([images.ref(i), names[images.labels[i]], names[int(pred[i])], f"{float(conf[i]):.4f}"])
