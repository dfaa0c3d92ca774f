"""Detectors (detect/model.py): each torchvision kind on the tiny timm CNN and the tiny transformers DETR trains
(every loss term, gradients into backbone and head) and detects in each image's own frame; FCOS learns one batch on
every loss term; padding, crowd regions and the tuning plans do what they say."""

from __future__ import annotations

import pytest
import torch
from torch.nn import BatchNorm2d

from visiontune.detect.config import DetectConfig
from visiontune.detect.data import read_boxes
from visiontune.detect.dataset import DetectionDataset
from visiontune.detect.model import build_detector
from visiontune.detect.task import DetectionCollator, plan_tuning
from visiontune.detect.transforms import detection_transforms
from visiontune.testing.detect_fixtures import CLASSES, write_detection_sets

KINDS = ["fcos", "retinanet", "faster_rcnn", "ssdlite", "detr"]
LOSSES = {
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "retinanet": {"classification", "bbox_regression"},
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "ssdlite": {"classification", "bbox_regression"},
    "detr": {"loss_ce", "loss_bbox", "loss_giou"},
}


@pytest.fixture(scope="module")
def boxes(tmp_path_factory):
    return read_boxes(str(write_detection_sets(tmp_path_factory.mktemp("boxes"))["coco-train"]))


@pytest.fixture(scope="module")
def batch(boxes):
    dataset = DetectionDataset(boxes, detection_transforms("none", 64, train=False), 10**8)
    return DetectionCollator()([dataset[i] for i in range(4)])  # four sizes, one image without objects


def _model(kind: str, fixtures_dir, classes=CLASSES):
    torch.manual_seed(0)
    if kind == "detr":
        return build_detector(str(fixtures_dir / "detr"), classes, image_size=64)
    return build_detector(f"timm:local-dir:{fixtures_dir / 'timm-cnn'}", classes, kind, 32, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_every_detector_trains_and_detects(kind, fixtures_dir, batch):
    model = _model(kind, fixtures_dir).train()
    out = model(**batch)
    assert LOSSES[kind] <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert set(model.head_names()) & set(grads) and set(model.backbone_names()) & set(grads)
    model.configure(conf=0.0, iou=None, max_detections=5)
    with torch.no_grad():
        found = model.eval()(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])["detections"]
    assert len(found) == 4
    for d, mask in zip(found, batch["pixel_mask"], strict=True):
        h, w = int(mask.any(1).sum()), int(mask.any(0).sum())
        assert 0 < len(d["boxes"]) <= 5
        assert (d["boxes"][:, 2] <= w + 1e-3).all() and (d["boxes"][:, 3] <= h + 1e-3).all()
        assert ((d["labels"] >= 0) & (d["labels"] < len(CLASSES))).all()  # background (class 0 of R-CNN/SSD) never


def test_fcos_learns_one_batch_on_every_loss_term(fixtures_dir, batch):
    """The check to run before a long run: on one batch every loss term falls (a term stuck where it starts, like a
    GIoU loss at 1.0 with every box a point, shows a learning rate that kills box regression)."""
    model = _model("fcos", fixtures_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(12):
        out = model(**batch)
        first = first or {k: float(out[k]) for k in LOSSES["fcos"]}
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    last = {k: float(out[k]) for k in LOSSES["fcos"]}
    assert last["classification"] < 0.5 * first["classification"], (first, last)
    assert last["bbox_regression"] < 0.7 * first["bbox_regression"], (first, last)
    assert last["bbox_ctrness"] < first["bbox_ctrness"], (first, last)


def test_padding_in_a_batch_does_not_change_detections(fixtures_dir, batch):
    model = _model("fcos", fixtures_dir).eval()
    model.configure(conf=0.0, iou=None, max_detections=20)
    h, w = int(batch["pixel_mask"][1].any(1).sum()), int(batch["pixel_mask"][1].any(0).sum())
    with torch.no_grad():
        padded = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])["detections"][1]
        alone = model(pixel_values=batch["pixel_values"][1:2, :, :h, :w])["detections"][0]
    torch.testing.assert_close(padded["boxes"], alone["boxes"])
    torch.testing.assert_close(padded["scores"], alone["scores"])


def test_crowd_regions_are_not_learned(fixtures_dir, batch):
    model = _model("fcos", fixtures_dir).train()
    crowd = {**batch["targets"][0]}
    crowd["boxes"] = torch.cat([crowd["boxes"], torch.tensor([[0.0, 0.0, 30.0, 30.0]])])
    crowd["labels"] = torch.cat([crowd["labels"], torch.tensor([0])])
    crowd["iscrowd"] = torch.cat([crowd["iscrowd"], torch.tensor([True])])
    single = {"pixel_values": batch["pixel_values"][:1], "pixel_mask": batch["pixel_mask"][:1]}
    with torch.no_grad():
        plain = model(**single, targets=batch["targets"][:1])["loss"]
        with_crowd = model(**single, targets=[crowd])["loss"]
    torch.testing.assert_close(plain, with_crowd)


def _cfg(model: str, **tune) -> DetectConfig:
    return DetectConfig(model=model, output_dir="runs/x", data={"train": "x.json"}, tune=tune)


@pytest.mark.parametrize("kind", ["fcos", "faster_rcnn", "detr"])
def test_tuning_plans_choose_what_trains(kind, fixtures_dir):
    def trained(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    source = "detr" if kind == "detr" else "timm:"
    model = _model(kind, fixtures_dir)
    everything, head, body = trained(model), set(model.head_names()), set(model.backbone_names())
    assert head and body and not head & body
    plan_tuning(model, _cfg(source, method="linear_probe"))
    assert trained(model) == head
    model = _model(kind, fixtures_dir)
    plan_tuning(model, _cfg(source, method="full", freeze_backbone=True))
    assert trained(model) == everything - body
    if kind != "detr":  # a frozen backbone keeps its pretrained batch-norm statistics (DETR's norms are frozen ones)
        model.train()
        norms = [m for n, m in model.named_modules() if n.startswith("net.backbone") and isinstance(m, BatchNorm2d)]
        assert norms and not any(m.training for m in norms)
    model = _model(kind, fixtures_dir)
    schedule = [{"epoch": 0, "blocks": 0}, {"epoch": 1, "blocks": 1}]
    plan = plan_tuning(model, _cfg(source, method="gradual_unfreeze", unfreeze=schedule))
    groups, rest = model.layer_groups()
    assert len(groups) > 2 and trained(model) == set(rest)
    plan.callbacks[0].apply(1)
    assert trained(model) == set(rest) | set(groups[-1])


def test_lora_adapts_the_attention_of_a_transformers_detector(fixtures_dir):
    model = _model("detr", fixtures_dir)
    plan_tuning(model, _cfg("detr", method="lora", lora={"r": 2, "alpha": 4}))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trained)
    assert all("lora_" in n or any(h in n for h in ("class_labels_classifier", "bbox_predictor")) for n in trained)


def test_lora_on_a_torchvision_detector_is_refused_when_the_recipe_is_read():
    with pytest.raises(ValueError, match="lora applies to transformers detectors"):
        _cfg("builtin:efficientnet-lite0", method="lora")
