"""`task: detect` — fine-tune an object detector (torchvision detectors on timm / built-in backbones, transformers
detection checkpoints).

What is its own: box-labelled data (read and checked once, detect/data.py), the detector and its tuning plan,
the evaluation (detections are lists of boxes per image, which the Trainer cannot concatenate: `DetectionTrainer`
runs that loop and scores it with COCO mAP), the exports, pictures and predictions. The runner does the rest.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from visiontune.classify.freeze import TuningPlan, backbone_plan
from visiontune.core.check import CheckedSplits, check_splits, read_splits
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.core.dataset import SetEpoch
from visiontune.core.errors import DataError
from visiontune.detect.check import ANNOTATIONS, find_bad_images
from visiontune.detect.config import DetectConfig, segments_masks
from visiontune.detect.data import BoxDataset, read_boxes, split_boxes
from visiontune.detect.dataset import CloseMosaic, DetectionDataset, MosaicDataset, detection_collate
from visiontune.detect.masks import instance_masks
from visiontune.detect.metrics import detection_report
from visiontune.detect.model import Detector, build_detector, image_sizes
from visiontune.detect.transforms import detection_transforms
from visiontune.run.arguments import loader_workers
from visiontune.run.records import RecordsTrainer, collect_records
from visiontune.run.task import Fit, Task
from visiontune.run.trainer import VisiontuneTrainer

MAX_PIXELS = PIL_MAX_PIXELS  # eval/predict of saved models
SAMPLES = 4  # validation images whose detections are kept for the report's pictures
PREDICT_CONF = 0.25  # `visiontune predict` shows confident boxes; evaluation scores weak ones too (eval.conf)


DetectData = CheckedSplits[BoxDataset]


class DetectTask(Task):
    name = "detect"

    def prepare(self, cfg: DetectConfig) -> DetectData:
        return load_split(cfg)

    def sizes(self, data: DetectData) -> dict[str, int]:
        objects = {
            name: sum(len(r.labels) for r in d.records) for name, d in (("train", data.train), ("val", data.val))
        }
        return {
            "train_samples": len(data.train),
            "val_samples": len(data.val),
            "train_objects": objects["train"],
            "val_objects": objects["val"],
        }

    def build(self, cfg: DetectConfig, data: DetectData, run_dir: Path) -> Fit:
        from transformers import set_seed

        set_seed(cfg.seed)  # the new neck and head start from the recipe's seed (the Trainer seeds only later)
        model = build_detector(cfg.model, data.train.class_names, cfg.detector, cfg.fpn_channels, cfg.data.image_size)
        model.configure(cfg.eval.conf, cfg.eval.iou, cfg.eval.max_detections)
        model.category_ids = list(data.train.category_ids)
        return detection_fit(model, cfg, data, plan_tuning(model, cfg))

    def evaluate_run(
        self, cfg: DetectConfig, fit: Fit, trainer: VisiontuneTrainer, data: DetectData, name: str
    ) -> dict:
        trainer.evaluate(metric_key_prefix=name)
        report = dict(trainer.compute_metrics.last)
        report.pop("records", None)
        return report

    def save(
        self, cfg: DetectConfig, fit: Fit, trainer: VisiontuneTrainer, data: DetectData, run_dir: Path, after: dict
    ) -> dict:
        from visiontune.detect.export import save_detector
        from visiontune.detect.pictures import report_pictures

        save_detector(fit.model, run_dir / "model")
        records = trainer.compute_metrics.last["records"]
        write_coco_results(run_dir / "eval" / "predictions.json", records, data.val)
        before = (
            json.loads((run_dir / "eval" / "before.json").read_text())
            if (run_dir / "eval" / "before.json").is_file()
            else {}
        )
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
        detector = build_detector(model, None).eval()
        masks = detector.segments
        boxes = read_boxes(data, "val", detector.class_names, on_bad_sample, max_image_pixels=MAX_PIXELS, masks=masks)
        kept, bad = check_splits({"eval": boxes}, lambda d: find_bad_images(d, MAX_PIXELS), on_bad_sample, ANNOTATIONS)
        dataset = DetectionDataset(kept["eval"], detection_transforms("none", detector.image_size, False), MAX_PIXELS)
        loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers, collate_fn=DetectionCollator())
        evaluator = DetectionEvaluator(kept["eval"])
        evaluator(run_detector(detector, loader))
        report = {k: v for k, v in evaluator.last.items() if k != "records"}
        report["skipped_samples"] = [{"ref": b.ref, "reason": b.reason} for b in [*boxes.skipped, *bad]]
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
            write_coco_results(out_dir / "predictions.json", evaluator.last["records"], kept["eval"])
        return report

    def predict(
        self,
        model: str,
        inputs: list[str],
        top_k: int = 5,
        conf: float = PREDICT_CONF,
        iou: float | None = None,
        out_dir: Path | None = None,
    ) -> list[dict]:
        """Boxes per image (original pixels); with `out_dir`, COCO results (predictions.json, image_id = position in
        `inputs`) and each image with its boxes drawn; a mask detector also writes each image's instance masks as a
        PNG (0 = no object, k = its k-th detection; the masks' RLEs are in predictions.json). `top_k` is the
        classifiers' option, unused here."""
        from visiontune.detect.pictures import draw_predictions, write_instance_png

        detector = build_detector(model, None).eval()
        detector.configure(conf, iou, detector.max_detections)
        results, coco = [], []
        for index, path in enumerate(inputs):
            image = load_image(path)
            found = detect_image(detector, image)
            names = detector.class_names
            results.append(
                {
                    "input": path,
                    "detections": [
                        {"label": names[int(c)], "score": float(s), "box": [round(float(v), 1) for v in b]}
                        for b, s, c in zip(found["boxes"], found["scores"], found["labels"], strict=True)
                    ],
                }
            )
            coco += coco_results(index, found, detector.category_ids, Path(path).name)
            if out_dir is not None:
                stem = f"{index:04d}-{Path(path).stem}"
                draw_predictions(image, found, names, out_dir / f"{stem}.png")
                if "masks" in found:
                    png = write_instance_png(found["masks"], image.height, image.width, out_dir / f"{stem}-masks.png")
                    results[-1]["masks"] = str(png)
        if out_dir is not None:
            (out_dir / "predictions.json").write_text(json.dumps(coco, indent=1))
        return results


# ------------------------------------------------------------------------------------------------ data


def load_split(cfg: DetectConfig) -> DetectData:
    """Read train (and val, or a seeded split of train), then decode-check every image of both at once."""
    d = cfg.data
    cap, masks = d.max_image_pixels, segments_masks(cfg.model, cfg.detector)
    read = lambda path, split, names: read_boxes(path, split, names, d.on_bad_sample, max_image_pixels=cap, masks=masks)  # noqa: E731
    find = lambda data: find_bad_images(data, d.max_image_pixels)  # noqa: E731
    return read_splits(d, cfg.seed, read, split_boxes, find, ANNOTATIONS)


class DetectionCollator:
    """One padded batch (images top-left aligned, `pixel_mask` marks real pixels), so the Trainer can count and move
    it, with the targets as plain tensors."""

    def __call__(self, batch: list[tuple]) -> dict[str, Any]:
        images, targets = detection_collate(batch)
        height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        pixels = torch.zeros(len(images), 3, height, width)
        mask = torch.zeros(len(images), height, width, dtype=torch.bool)
        for i, image in enumerate(images):
            h, w = image.shape[-2:]
            pixels[i, :, :h, :w] = image.as_subclass(torch.Tensor)
            mask[i, :h, :w] = True
        plain = [
            {
                "boxes": t["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
                "labels": t["labels"],
                "iscrowd": t["iscrowd"],
                "image_id": torch.tensor(t["image_id"]),
                "orig_size": torch.tensor(t["orig_size"]),
                **({"masks": t["masks"].as_subclass(torch.Tensor).to(torch.uint8)} if "masks" in t else {}),
            }
            for t in targets
        ]
        return {"pixel_values": pixels, "pixel_mask": mask, "targets": plain}


def detection_fit(model: Detector, cfg: DetectConfig, data: DetectData, plan: TuningPlan) -> Fit:
    d, t = cfg.data, cfg.train
    eval_tf = detection_transforms("none", model.image_size, train=False)
    train, epochs = training_set(cfg, data.train, model.image_size)
    return Fit(
        model=model,
        train_dataset=train,
        eval_dataset=DetectionDataset(data.val, eval_tf, d.max_image_pixels),
        collator=DetectionCollator(),
        compute_metrics=DetectionEvaluator(data.val),
        make_optimizer=plan.optimizer(t),
        callbacks=[*plan.callbacks, *epochs],
        trainer_class=DetectionTrainer,
        workers=loader_workers(d.workers, in_memory=False),
    )


def training_set(
    cfg: DetectConfig, data: BoxDataset, image_size: int
) -> tuple[DetectionDataset | MosaicDataset, list[TrainerCallback]]:
    """The augmented training set (a mosaic of it with data.augment.mosaic) and the callbacks that tell it each
    epoch: its augmentation draws per item from (seed, epoch, index), so a resumed run sees what the uninterrupted
    one saw."""
    a = cfg.data.augment
    transform = detection_transforms(a.preset, image_size, train=True, hflip=a.hflip)
    plain = DetectionDataset(data, transform, cfg.data.max_image_pixels, seed=cfg.seed)
    if a.preset == "none" or a.mosaic == 0:  # preset none augments nothing (a written mosaic is refused there)
        return plain, [SetEpoch(plain)]
    mosaic = MosaicDataset(plain, image_size, a.mosaic)
    return mosaic, [SetEpoch(mosaic), *([CloseMosaic(mosaic, a.mosaic_off_epochs)] if a.mosaic_off_epochs else [])]


def plan_tuning(model: Detector, cfg: DetectConfig) -> TuningPlan:
    """What trains: everything (full), all but the backbone (freeze_backbone), the head (linear_probe), the neck and
    head plus a growing top of the backbone (gradual_unfreeze), or LoRA adapters plus the head (lora)."""
    from visiontune.detect.model import apply_lora

    frozen = set(model.backbone_names()) if cfg.tune.method == "full" and cfg.tune.freeze_backbone else set()
    return backbone_plan(model, cfg, apply_lora, set(model.head_names()), frozen)


# ------------------------------------------------------------------------------------------ evaluation


class DetectionTrainer(RecordsTrainer):
    """Detections are a list of boxes per image, which the Trainer's loop cannot concatenate: `run_detector` makes
    them, `compute_metrics` (a `DetectionEvaluator`) scores them with COCO mAP."""

    @staticmethod
    def collect(model: torch.nn.Module, loader, prepare) -> list[dict]:
        return run_detector(model, loader, prepare)


def run_detector(model: torch.nn.Module, loader, prepare=None) -> list[dict]:
    """Detections for every image of `loader` on the CPU: boxes in the pixels the detector saw ("size"; the
    evaluator scales them), a mask detector's masks as RLEs already in the original image's frame."""

    def per_batch(batch: dict) -> list[dict]:
        found = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])["detections"]
        sizes = image_sizes(batch["pixel_values"], batch["pixel_mask"])
        records = []
        for d, size, t in zip(found, sizes, batch["targets"], strict=True):
            record = {k: v.detach().float().cpu() for k, v in d.items() if k != "masks"}
            if "masks" in d:
                record["masks"] = original_masks(d["masks"], tuple(int(v) for v in t["orig_size"]))
            records.append({"image_id": int(t["image_id"]), **record, "size": size})
        return records

    return collect_records(model, loader, prepare, per_batch)


def original_masks(probabilities: torch.Tensor, size: tuple[int, int]) -> list[dict]:
    """Mask R-CNN's [N, 1, h, w] mask probabilities resized to the original image (bilinear, then the threshold, as
    torchvision pastes masks) as compressed RLEs: one float mask per detection per image would not fit in memory
    over a validation set. Resized in chunks for the same reason."""
    import torch.nn.functional as F

    from visiontune.detect.masks import MASK_THRESHOLD, encode

    rles: list[dict] = []
    for chunk in probabilities.float().split(16):
        resized = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)[:, 0]
        rles += encode((resized >= MASK_THRESHOLD).cpu())
    return rles


class DetectionEvaluator:
    """`compute_metrics` of the detect task: scores detections against the original annotations of `data` (not the
    resized ones: COCO's small/medium/large areas are in original pixels) and keeps the full report in `.last`."""

    def __init__(self, data: BoxDataset):
        self.data = data
        self.last: dict[str, Any] = {}

    def __call__(self, records: list[dict]) -> dict[str, float]:
        by_id = {r["image_id"]: r for r in records}  # the last batch of a rank-sharded loader repeats images
        records = [_original_frame(by_id[i], self.data.records[i]) for i in sorted(by_id)]
        targets = [
            {
                "boxes": self.data.records[r["image_id"]].boxes,
                "labels": self.data.records[r["image_id"]].labels,
                "iscrowd": self.data.records[r["image_id"]].iscrowd,
                # drawn when scored, one image at a time (detection_report)
                **({"masks": partial(instance_masks, self.data.records[r["image_id"]])} if "masks" in r else {}),
            }
            for r in records
        ]
        report = detection_report(records, targets, self.data.class_names)
        report["samples"] = [_listed(r) for r in records[:SAMPLES]]
        report["records"] = records
        self.last = report
        return report["metrics"]


def _original_frame(record: dict, box_record) -> dict:
    h, w = record["size"]
    scale = torch.tensor([box_record.width / w, box_record.height / h] * 2)
    return {**record, "boxes": record["boxes"] * scale}


def _listed(record: dict) -> dict:
    return {
        "image_id": record["image_id"],
        "boxes": [[round(v, 2) for v in b] for b in record["boxes"].tolist()],
        "scores": [round(s, 4) for s in record["scores"].tolist()],
        "labels": record["labels"].long().tolist(),
        **({"masks": record["masks"]} if "masks" in record else {}),  # RLEs, original frame
    }


def write_coco_results(path: Path, records: list[dict], data: BoxDataset) -> None:
    """COCO results format: one {"image_id", "category_id", "bbox": [x, y, w, h], "score"} per detection, with the
    data's own category ids; image_id is the image's position in the set (its file is named alongside)."""
    found = []
    for r in records:
        found += coco_results(r["image_id"], r, data.category_ids, data.records[r["image_id"]].image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=1))


def coco_results(image_id: int, found: dict, category_ids: list[int], file_name: str) -> list[dict]:
    """COCO results of one image's detections; a mask detector's carry their `segmentation` RLE too."""
    masks = found.get("masks") or [None] * len(found["scores"])
    return [
        {
            "image_id": image_id,
            "file_name": file_name,
            "category_id": int(category_ids[int(c)]),
            "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)],
            "score": round(float(s), 4),
            **({"segmentation": m} if m is not None else {}),
        }
        for b, s, c, m in zip(found["boxes"].tolist(), found["scores"], found["labels"], masks, strict=True)
    ]


# ---------------------------------------------------------------------------------------------- predict


def load_image(path: str):
    from visiontune.core.images import open_image

    try:
        return open_image(path, MAX_PIXELS)
    except Exception as err:
        raise DataError(f"{path} {err}; give a readable image file.") from None


def detect_image(detector: Detector, image) -> dict[str, torch.Tensor]:
    """Detections on one PIL image, boxes in its own pixels."""
    from torchvision import tv_tensors

    empty = {
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(image.height, image.width)),
        "labels": torch.zeros(0, dtype=torch.long),
        "iscrowd": torch.zeros(0, dtype=torch.bool),
        "image_id": 0,
        "orig_size": (image.height, image.width),
    }
    pixels, _ = detection_transforms("none", detector.image_size, train=False)(tv_tensors.Image(image), empty)
    batch = DetectionCollator()([(pixels, empty)])
    (record,) = run_detector(detector, [batch])
    h, w = record["size"]
    scale = torch.tensor([image.width / w, image.height / h] * 2)
    return {**record, "boxes": record["boxes"] * scale}
