"""`task: segment` — fine-tune a semantic segmentation model (a decoder on a timm / built-in backbone, or a
transformers semantic-segmentation checkpoint).

What is its own: mask-labelled data (read and checked once, segment/data.py), the segmenter and its tuning plan,
the evaluation (masks at each image's own size, which the Trainer cannot concatenate: `SegmentationTrainer` runs
segment/inference.py over the validation images and scores pixel confusion counts), the exports, pictures and
predictions. The runner does the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visiontune.classify.freeze import TuningPlan, backbone_plan
from visiontune.classify.task import ClassifierTrainer, lone_last_batch
from visiontune.core.check import CheckedSplits, check_splits, read_splits
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.core.dataset import SetEpoch
from visiontune.core.errors import ModelError
from visiontune.detect.check import find_bad_images
from visiontune.run.arguments import loader_workers
from visiontune.run.records import RecordsTrainer
from visiontune.run.task import Fit, Task
from visiontune.segment.check import MASKS
from visiontune.segment.config import SegmentConfig
from visiontune.segment.data import MaskDataset, read_masks, split_masks
from visiontune.segment.dataset import SegmentationDataset
from visiontune.segment.inference import IndexedImages, SegmentationCollator, SegmentationEvaluator, image_logits
from visiontune.segment.model import Segmenter, build_segmenter
from visiontune.segment.transforms import segmentation_transforms

MAX_PIXELS = PIL_MAX_PIXELS  # eval/predict of saved models
RESIZE = {"mode": "resize", "stride": 2 / 3}  # inference of a model saved without its recipe's eval settings


SegmentData = CheckedSplits[MaskDataset]


class SegmentTask(Task):
    name = "segment"

    def prepare(self, cfg: SegmentConfig) -> SegmentData:
        return load_split(cfg)

    def sizes(self, data: SegmentData) -> dict[str, int]:
        return {"train_samples": len(data.train), "val_samples": len(data.val)}

    def build(self, cfg: SegmentConfig, data: SegmentData, run_dir: Path) -> Fit:
        from transformers import set_seed

        set_seed(cfg.seed)  # the new decoder / head starts from the recipe's seed (the Trainer seeds only later)
        d = cfg.data
        names = data.train.class_names
        model = build_segmenter(
            cfg.model, names, cfg.decoder, cfg.decoder_channels, d.image_size, d.ignore_index, cfg.decoder_refine
        )
        model.dice = cfg.train.loss == "dice_ce"
        if model.dice and model.universal:
            raise ModelError(
                f"train.loss dice_ce needs per-pixel logits and {cfg.model} predicts mask queries (it trains with its "
                "own matched mask loss); remove train.loss."
            )
        # what eval / predict of the saved model must do as this recipe did (the manifest keeps it)
        model.spec |= {
            "inference": {"mode": cfg.eval.mode, "stride": cfg.eval.stride},
            "palette": d.palette,
            "reduce_labels": d.reduce_labels and d.palette is None,  # what the reader did (palettes name classes)
        }
        plan = backbone_plan(model, cfg, _apply_lora, set(model.decoder_names()), set())
        return segmentation_fit(model, cfg, data, plan)

    def evaluate_run(
        self, cfg: SegmentConfig, fit: Fit, trainer: SegmentationTrainer, data: SegmentData, name: str
    ) -> dict:
        trainer.evaluate(metric_key_prefix=name)
        return dict(trainer.compute_metrics.last)

    def save(
        self, cfg: SegmentConfig, fit: Fit, trainer: SegmentationTrainer, data: SegmentData, run_dir: Path, after: dict
    ) -> dict:
        from visiontune.segment.export import save_segmenter
        from visiontune.segment.pictures import report_pictures

        save_segmenter(fit.model, run_dir / "model")
        before_file = run_dir / "eval" / "before.json"
        before = json.loads(before_file.read_text()) if before_file.is_file() else {}
        report_pictures(run_dir, fit.eval_dataset, before, after)
        return {}

    # ---- saved models (visiontune eval / predict)
    def evaluate(
        self,
        model: str,
        data: str,
        out_dir: Path | None = None,
        batch_size: int = 8,
        workers: int = 0,
        on_bad_sample: str = "error",
    ) -> dict:
        """The metrics of a saved segmenter on a labelled set (read with the model's classes, palette and ignore
        index), inferred as its recipe's `eval` said."""
        segmenter = build_segmenter(model, None).eval()
        spec = segmenter.spec
        masks = read_masks(
            data,
            "val",
            segmenter.class_names,
            palette=spec.get("palette"),
            ignore_index=segmenter.ignore_index,
            on_bad_sample=on_bad_sample,
            max_image_pixels=MAX_PIXELS,
            reduce_labels=bool(spec.get("reduce_labels")),
        )
        find = lambda d: find_bad_images(d, MAX_PIXELS)  # noqa: E731
        kept, bad = check_splits({"eval": masks}, find, on_bad_sample, MASKS)
        loader = torch.utils.data.DataLoader(
            IndexedImages(kept["eval"], MAX_PIXELS), batch_size, num_workers=workers, collate_fn=SegmentationCollator()
        )
        evaluator = _evaluator(segmenter)
        evaluator(evaluator.collect(segmenter, loader))
        report = {k: v for k, v in evaluator.last.items() if k != "samples"}
        report["skipped_samples"] = [{"ref": b.ref, "reason": b.reason} for b in [*masks.skipped, *bad]]
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
        return report

    def predict(self, model: str, inputs: list[str], top_k: int = 5, out_dir: Path | None = None) -> list[dict]:
        """Per image, the classes covering most of it (`top_k`, share of pixels); with `out_dir`, each image's mask
        as a PNG of class ids (NNNN-NAME.png) and overlaid on the image (NNNN-NAME-overlay.png)."""
        from visiontune.detect.task import load_image
        from visiontune.segment.pictures import write_prediction

        segmenter = build_segmenter(model, None).eval()
        results = []
        for index, path in enumerate(inputs):
            image = load_image(path)
            mask = predict_mask(segmenter, image)
            shares = torch.bincount(torch.from_numpy(mask).reshape(-1), minlength=len(segmenter.class_names))
            shares = shares.double() / mask.size
            top = shares.topk(min(top_k, len(shares)))
            result: dict[str, Any] = {
                "input": path,
                "top": [(segmenter.class_names[c], float(s)) for s, c in zip(*top, strict=True) if s > 0],
            }
            if out_dir is not None:
                stem = out_dir / f"{index:04d}-{Path(path).stem}"
                result["mask"], result["overlay"] = (
                    str(p) for p in write_prediction(image, mask, segmenter.class_names, stem)
                )
            results.append(result)
        return results


def _evaluator(segmenter: Segmenter) -> SegmentationEvaluator:
    inference = segmenter.spec.get("inference") or RESIZE
    return SegmentationEvaluator(segmenter.class_names, segmenter.ignore_index, inference["mode"], inference["stride"])


def predict_mask(segmenter: Segmenter, image) -> Any:
    """The class-id mask [H, W] (numpy int64) of a PIL image, inferred as the model's recipe said."""
    from torchvision.transforms.functional import pil_to_tensor

    inference = segmenter.spec.get("inference") or RESIZE
    device = next(segmenter.parameters()).device
    pixels = pil_to_tensor(image.convert("RGB")).float().div(255).to(device)
    with torch.no_grad():
        (logits,) = image_logits(segmenter, [pixels], inference["mode"], inference["stride"])
    return logits.argmax(0).cpu().numpy()


# ------------------------------------------------------------------------------------------------ data


def load_split(cfg: SegmentConfig) -> SegmentData:
    """Read train (and val, or a seeded split of train; every mask decoded and checked), then decode-check every
    image of both at once."""
    d = cfg.data
    options = dict(
        palette=d.palette,
        ignore_index=d.ignore_index,
        on_bad_sample=d.on_bad_sample,
        max_image_pixels=d.max_image_pixels,
        reduce_labels=d.reduce_labels,
    )
    read = lambda path, split, names: read_masks(path, split, names, **options)  # noqa: E731
    find = lambda data: find_bad_images(data, d.max_image_pixels)  # noqa: E731
    return read_splits(d, cfg.seed, read, split_masks, find, MASKS)


def segmentation_fit(model: Segmenter, cfg: SegmentConfig, data: SegmentData, plan: TuningPlan) -> Fit:
    d, t = cfg.data, cfg.train
    augment = segmentation_transforms(
        d.augment.preset, model.image_size, train=True, hflip=d.augment.hflip, ignore_index=d.ignore_index
    )
    # augmentation drawn per item from (seed, epoch, index): a resumed run sees what the uninterrupted one saw
    train_dataset = SegmentationDataset(data.train, augment, d.max_image_pixels, seed=cfg.seed)
    return Fit(
        model=model,
        train_dataset=train_dataset,
        eval_dataset=IndexedImages(data.val, d.max_image_pixels),
        collator=SegmentationCollator(),
        compute_metrics=SegmentationEvaluator(data.train.class_names, d.ignore_index, cfg.eval.mode, cfg.eval.stride),
        make_optimizer=plan.optimizer(t),
        callbacks=[*plan.callbacks, SetEpoch(train_dataset)],
        trainer_class=SegmentationTrainer,
        trainer_attrs={"drop_lone_batch": lone_last_batch(model, len(data.train), t.batch_size)},
        workers=loader_workers(d.workers, in_memory=False),
    )


def _apply_lora(model: Segmenter, cfg: Any) -> None:
    from visiontune.segment.model import apply_lora

    apply_lora(model, cfg)


class SegmentationTrainer(RecordsTrainer, ClassifierTrainer):
    """Evaluation through `SegmentationEvaluator` (masks at each image's own size); training drops a last batch of
    one image as classifiers do (`lone_last_batch`: BatchNorm cannot train on one 1x1 deepest map)."""

    def collect(self, model: torch.nn.Module, loader, prepare) -> list[dict]:
        return self.compute_metrics.collect(model, loader, prepare)
