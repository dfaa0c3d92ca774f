"""`task: clip_contrastive` — contrastive image-text fine-tuning of a dual encoder, the way CLIP was pretrained
(FLYP: "finetune like you pretrain").

Reads top to bottom: caption pairs (split by image) -> dual encoder with the `trainable` parts unfrozen -> Trainer
-> evaluate before -> train -> evaluate after -> save the encoder -> report. Evaluation is image<->text Recall@K
over the whole validation set, plus zero-shot accuracy on labelled data when `data.zero_shot` is set.

`trainable` is name-based: `vision` = `vision_model.*` + `visual_projection.*`, `text` = `text_model.*` +
`text_projection.*`, `projections` = the two projections only, `both` = all four; the temperature `logit_scale`
always trains (it is the loss's own parameter, as in CLIP). SigLIP has no separate projection layers (its heads
live inside `vision_model` / `text_model`), so `projections` is refused for it. SigLIP's `logit_bias` belongs to
its sigmoid loss and stays frozen here.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from visiontune.clip.captions import (
    CaptionCollator,
    CaptionedImages,
    CaptionPairs,
    clean_pair_splits,
    clean_pairs,
    identify_pairs,
    pair_duplicates,
    read_captions,
    refuse_pair_leak,
    split_by_image,
    stack_pixels,
)
from visiontune.clip.config import CaptionDataConfig, ClipContrastiveConfig
from visiontune.clip.dual_encoder import (
    DualEncoder,
    hold_scalars_as_vectors,
    image_features,
    resolve_dual_encoder,
    text_features,
)
from visiontune.clip.retrieval import retrieval_metrics
from visiontune.clip.zero_shot import zero_shot_head
from visiontune.core.check import BadSample, clean
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.core.dataset import Collator, ImageClassificationDataset
from visiontune.core.errors import DataError, ModelError
from visiontune.core.identity import fingerprint
from visiontune.core.readers import LabeledImages, read_dataset
from visiontune.core.transforms import eval_transform, train_transform, with_image_size
from visiontune.run.arguments import loader_workers
from visiontune.run.distributed import launched_world_size
from visiontune.run.task import Fit, Skipped, Task
from visiontune.run.trainer import VisiontuneTrainer, fsdp2_gathered

TRAINABLE = {
    "both": ("vision_model.", "visual_projection.", "text_model.", "text_projection."),
    "vision": ("vision_model.", "visual_projection."),
    "text": ("text_model.", "text_projection."),
    "projections": ("visual_projection.", "text_projection."),
}
TOWERS = ("vision_model", "text_model")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learnt temperature so logits never exceed 100 x cosine
MAX_PIXELS = PIL_MAX_PIXELS


@dataclass
class CaptionSplit:
    train: CaptionPairs
    val: CaptionPairs
    skipped: list[BadSample] = field(default_factory=list)


@dataclass
class ZeroShotData:
    images: LabeledImages
    class_names: list[str]  # the names written into the prompts, in label order
    templates: list[str] | str
    skipped: list[BadSample] = field(default_factory=list)


@dataclass
class ContrastiveData:
    pairs: CaptionSplit
    zero_shot: ZeroShotData | None


class ClipContrastiveTask(Task):
    name = "clip_contrastive"

    def prepare(self, cfg: ClipContrastiveConfig) -> ContrastiveData:
        return ContrastiveData(load_caption_split(cfg.data, cfg.seed), load_zero_shot(cfg.data))

    def skipped(self, data: ContrastiveData) -> list[Skipped]:
        bad = data.pairs.skipped + (data.zero_shot.skipped if data.zero_shot else [])
        return [Skipped(b.ref, b.reason) for b in bad]

    def sizes(self, data: ContrastiveData) -> dict[str, int]:
        pairs, zero_shot = data.pairs, data.zero_shot
        return {
            "train_images": len(pairs.train.images()),
            "train_pairs": len(pairs.train),
            "val_images": len(pairs.val.images()),
            "val_pairs": len(pairs.val),
            "zero_shot_samples": len(zero_shot.images) if zero_shot else 0,
        }

    def findings(self, data: ContrastiveData) -> dict:
        """Duplicate pairs per split and the fingerprint a resume must find unchanged (data_report.json)."""
        splits = {"train": data.pairs.train, "val": data.pairs.val}
        records = {role: (identify_pairs(pairs)[0], pairs.captions) for role, pairs in splits.items()}
        return {
            "duplicates": {role: pair_duplicates(pairs) for role, pairs in splits.items()},
            "data": fingerprint(records, None),
        }

    def build(self, cfg: ClipContrastiveConfig, data: ContrastiveData, run_dir: Path) -> Fit:
        encoder = resolve_dual_encoder(cfg.model)
        encoder.preprocess = with_image_size(encoder.preprocess, cfg.data.image_size)
        model = ContrastiveModel(encoder)
        set_trainable(model.model, cfg.trainable, cfg.model)
        if cfg.train.deepspeed or cfg.train.fsdp:
            hold_scalars_as_vectors(model.model)
        if cfg.train.grad_checkpointing:
            _enable_grad_checkpointing(model.model, cfg.model)
        pre, max_pixels, seed, aug = encoder.preprocess, cfg.data.max_image_pixels, cfg.seed, cfg.data.augment
        augment = train_transform(pre, preset=aug.preset, hflip=aug.hflip, policy=aug.policy)
        train_set = CaptionedImages(data.pairs.train, augment, max_pixels, seed, pre.image_size)
        world = launched_world_size()
        return Fit(
            model=model,
            train_dataset=train_set,
            eval_dataset=CaptionedImages(data.pairs.val, eval_transform(pre), max_pixels, seed, pre.image_size),
            collator=CaptionCollator(encoder.tokenize),
            trainer_class=ContrastiveTrainer,
            callbacks=[CaptionEpoch(train_set)],
            # Workers copy the dataset when they start; persistent ones would never see the next epoch's captions.
            # A short last batch has few negatives (size 1: loss 0), which only adds noise to the contrastive signal.
            args={
                "dataloader_persistent_workers": False,
                "dataloader_drop_last": len(train_set) > cfg.train.batch_size * world,
            },
            workers=loader_workers(cfg.data.workers, in_memory=data.pairs.train.kind == "array"),
        )

    def evaluate_run(
        self, cfg: ClipContrastiveConfig, fit: Fit, trainer: Any, data: ContrastiveData, name: str
    ) -> dict:
        """Retrieval metrics (and zero-shot accuracy) of the in-training model."""
        trainer.evaluate(metric_key_prefix=name)
        metrics = dict(trainer.last)
        if data.zero_shot is not None:
            args = trainer.args
            with fsdp2_gathered(trainer):  # it calls the towers outside the model's forward
                extra = zero_shot_metrics(
                    trainer.model, data.zero_shot, args.eval_batch_size, args.dataloader_num_workers
                )
            trainer.log({f"{name}_{k}": v for k, v in extra.items()})
            metrics |= extra
        return {"metrics": metrics}

    def save(
        self, cfg: ClipContrastiveConfig, fit: Fit, trainer: Any, data: ContrastiveData, run_dir: Path, after: dict
    ) -> dict:
        encoder = fit.model.encoder
        encoder.save(run_dir / "model", extra_meta={"task": "clip_contrastive", "trainable": cfg.trainable})
        trainable = sum(p.numel() for p in encoder.model.parameters() if p.requires_grad)
        return {"trainable": cfg.trainable, "trainable_parameters": trainable}

    def evaluate(
        self,
        model: str,
        data: str,
        out_dir: Path | None = None,
        batch_size: int = 64,
        workers: int = 0,
        on_bad_sample: str = "error",
        image_root: str | None = None,
        zero_shot: str | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | str = "builtin",
    ) -> dict:
        """Recall@K of a dual encoder (run folder, saved model or any CLIP/SigLIP) on caption data; zero-shot
        accuracy too when `zero_shot` names labelled data."""
        encoder = resolve_dual_encoder(model)
        pairs, skipped = clean_pairs(read_captions(data, image_root, split="test"), on_bad_sample, MAX_PIXELS, "val")
        wrapper = ContrastiveModel(encoder).to(_device())
        images = CaptionedImages(pairs, eval_transform(encoder.preprocess), MAX_PIXELS)
        metrics, similarity = retrieval_scores(wrapper, images, batch_size, workers, loss_batch=batch_size)
        if zero_shot is not None:
            cfg = CaptionDataConfig(
                train=data,
                zero_shot=zero_shot,
                zero_shot_class_names=class_names,
                templates=templates,
                on_bad_sample=on_bad_sample,
            )
            metrics |= zero_shot_metrics(wrapper, load_zero_shot(cfg), batch_size, workers)
        report = {"metrics": metrics, "skipped_samples": [{"ref": b.ref, "reason": b.reason} for b in skipped]}
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
            _write_predictions(out_dir / "predictions.csv", pairs, similarity)
        return report

    def predict(self, model: str, inputs: list[str], top_k: int = 5, labels: list[str] | None = None) -> list[dict]:
        """Zero-shot classification of each image over the labels the user types (predict --labels)."""
        from visiontune.classify.task import predict_images
        from visiontune.clip.classify import load_clip_classifier

        if not labels:
            raise ModelError(
                f"{model} is a dual encoder (task clip_contrastive) with no classes of its own; pass the labels to "
                "score each image against, e.g. --labels 'cat,dog,a red car'."
            )
        return predict_images(load_clip_classifier(model, labels), inputs, top_k)


class ContrastiveModel(nn.Module):
    """A dual encoder's model behind Trainer's interface: forward -> {"loss": symmetric InfoNCE, "logits": [B, B]}.
    Row i of `logits` scores image i against every caption of the batch; caption i is image i's positive."""

    def __init__(self, encoder: DualEncoder):
        super().__init__()
        self.model = encoder.model
        self.encoder = encoder  # a plain dataclass (not a submodule): tokenizer + text encoding for evaluation

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        images = F.normalize(image_features(self.model, pixel_values), dim=-1)  # [B, D]
        texts = F.normalize(text_features(self.model, input_ids=input_ids, attention_mask=attention_mask), dim=-1)
        logits = logit_scale(self.model) * images @ texts.T  # [B, B]
        return {"loss": info_nce(logits, labels), "logits": logits}

    def train(self, mode: bool = True) -> ContrastiveModel:
        """A frozen tower stays in eval mode: frozen means frozen, so no dropout and no BatchNorm statistics drifting
        towards the new data (the built-in EfficientNet tower has BatchNorm)."""
        super().train(mode)
        for name in TOWERS:
            tower = getattr(self.model, name, None)
            if tower is not None and not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        return self


def logit_scale(model: nn.Module) -> torch.Tensor:
    return model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(())


def info_nce(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's loss: the mean of cross-entropy over each image's row (image->text) and each caption's column
    (text->image). `labels[i]` is the caption of image i, a permutation (default: the diagonal)."""
    order = torch.arange(len(logits), device=logits.device)
    image_target = order if labels is None else labels
    text_target = torch.empty_like(image_target)
    text_target[image_target] = order  # caption labels[i]'s image is i
    logits = logits.float()
    return (F.cross_entropy(logits, image_target) + F.cross_entropy(logits.T, text_target)) / 2


def set_trainable(model: nn.Module, trainable: str, name: str) -> int:
    """Unfreeze the parameters `trainable` names (see the module docstring); returns how many values train."""
    names = [n for n, _ in model.named_parameters()]
    if trainable == "projections" and not any(n.startswith(TRAINABLE["projections"]) for n in names):
        raise ModelError(
            f"model: {name} has no separate projection layers (visual_projection / text_projection; "
            "SigLIP keeps its heads inside vision_model / text_model), so set trainable to both, vision "
            "or text."
        )
    count = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(TRAINABLE[trainable]) or n == "logit_scale")
        count += p.numel() if p.requires_grad else 0
    return count


def load_caption_split(d: CaptionDataConfig, seed: int) -> CaptionSplit:
    """Read train (and val, or a seeded split by image), then check every pair once."""
    train = read_captions(d.train, d.image_root, seed, split="train")
    if d.val:
        val = read_captions(d.val, d.image_root, seed, split="validation")
        identify_pairs(train, val)  # both at once, so that image keys compare across the two
    else:
        train, val = split_by_image(train, d.val_split, seed)
    kept, bad = clean_pair_splits({"train": train, "val": val}, d.on_bad_sample, d.max_image_pixels)
    refuse_pair_leak(kept["train"], kept["val"])
    return CaptionSplit(kept["train"], kept["val"], bad)


def load_zero_shot(d: CaptionDataConfig) -> ZeroShotData | None:
    """Labelled data for zero-shot accuracy (classes as prompts), or None when `data.zero_shot` is unset."""
    if d.zero_shot is None:
        return None
    images, skipped = clean(read_dataset(d.zero_shot, split="test"), d.on_bad_sample, d.max_image_pixels, "zero_shot")
    names = d.zero_shot_class_names or images.class_names
    if len(names) != len(images.class_names):
        raise DataError(
            f"data.zero_shot_class_names has {len(names)} names but {d.zero_shot} has "
            f"{len(images.class_names)} classes {images.class_names}; give one name per class, in label "
            "order."
        )
    return ZeroShotData(images, list(names), d.templates, skipped)


class ContrastiveTrainer(VisiontuneTrainer):
    """Trainer whose evaluation is retrieval over the whole validation set.

    Why `evaluate` is overridden rather than given a `compute_metrics`: Trainer's loop runs the model batch by batch
    and concatenates per-batch outputs, but Recall@K ranks every image against every caption of the set, and
    against all captions of each image, not the one sampled caption a training batch carries. So we embed all
    validation images and captions once and score them with `retrieval_metrics`; logging, callbacks and
    best-checkpoint selection stay Trainer's, fed the same `{prefix}_{metric}` dict its own evaluate returns."""

    last: dict[str, float] | None = None  # the latest evaluation's metrics, unprefixed

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        start = time.perf_counter()
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        with fsdp2_gathered(self):  # FSDP2: the towers run outside the model's forward, so whole weights first
            self.last, _ = retrieval_scores(
                self.model,
                dataset,
                self.args.eval_batch_size,
                self.args.dataloader_num_workers,
                self.args.per_device_train_batch_size,
            )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.last.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class CaptionEpoch(TrainerCallback):
    """Tells the training set which epoch starts, so each image gets its caption of that epoch. A callback, not
    accelerate's `set_epoch` forwarding, which skips the dataset when the sampler is sharded (DDP)."""

    def __init__(self, dataset: CaptionedImages):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


def retrieval_scores(
    model: ContrastiveModel, images: CaptionedImages, batch_size: int, workers: int, loss_batch: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Recall@K over every image and every caption of `images.pairs`, the mean InfoNCE loss over batches of
    `loss_batch` images (each with its first caption), and the [captions, images] similarity matrix."""
    was_training = model.training
    model.eval()
    image_embeds = _embed_images(model.model, images, batch_size, workers)
    text_embeds = model.encoder.encode_texts(images.pairs.captions)
    model.train(was_training)
    metrics = retrieval_metrics(image_embeds, text_embeds, images.pairs.image_index())
    first = torch.tensor([group[0] for group in images.groups], device=text_embeds.device)
    metrics["loss"] = _batched_loss(model.model, image_embeds, text_embeds[first], loss_batch)
    return metrics, (text_embeds @ image_embeds.T).cpu()


def zero_shot_metrics(model: ContrastiveModel, data: ZeroShotData, batch_size: int, workers: int) -> dict[str, float]:
    """Top-1 accuracy of cos(image, class prompt embedding), CLIP's zero-shot classifier."""
    was_training, encoder = model.training, model.encoder
    model.eval()
    head = zero_shot_head(encoder, data.class_names, data.templates)  # [C, D], unit rows
    ds = ImageClassificationDataset(data.images, eval_transform(encoder.preprocess), MAX_PIXELS)
    embeds = _embed_images(encoder.model, ds, batch_size, workers, Collator())
    model.train(was_training)
    predicted = (embeds @ head.T).argmax(-1).cpu()
    correct = (predicted == torch.tensor(data.images.labels)).sum().item()
    return {"zero_shot_accuracy": correct / len(data.images)}


@torch.inference_mode()
def _embed_images(
    model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int, workers: int, collate=stack_pixels
) -> torch.Tensor:
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    out = [image_features(model, batch["pixel_values"].to(device)).float() for batch in loader]
    return F.normalize(torch.cat(out), dim=-1)  # [N, D]


def _batched_loss(model: nn.Module, images: torch.Tensor, texts: torch.Tensor, batch: int) -> float:
    """InfoNCE over fixed, shuffled batches: data often comes sorted (by class, by source), and consecutive images
    would give batches unlike the shuffled training ones, so the loss would not be comparable to the training loss."""
    scale = logit_scale(model).float()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
    total = 0.0
    for s in range(0, len(images), batch):
        rows = order[s : s + batch]
        total += info_nce(scale * images[rows] @ texts[rows].T).item() * len(rows)
    return total / len(images)


def _write_predictions(path: Path, pairs: CaptionPairs, similarity: torch.Tensor) -> None:
    """Text->image: each caption, its image and the image it retrieves first."""
    groups = pairs.images()
    best = similarity.argmax(-1).tolist()
    truth = pairs.image_index()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["record", "caption", "image", "retrieved", "correct"])
        for i, caption in enumerate(pairs.captions):
            image, found = groups[truth[i]][0], groups[best[i]][0]
            writer.writerow(
                [pairs.refs[i], caption, _image_name(pairs, image), _image_name(pairs, found), int(best[i] == truth[i])]
            )


def _image_name(pairs: CaptionPairs, i: int) -> str:
    return str(pairs.sources[i]) if pairs.kind == "file" else pairs.refs[i]


def _enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    if getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        print(f"note: {name} does not support gradient checkpointing; training without it")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
