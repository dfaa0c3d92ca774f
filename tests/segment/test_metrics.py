"""Segmentation metrics: mIoU, per-class IoU, pixel accuracy and mean Dice from a pixel confusion matrix that never
counts the ignore index, checked against one worked out by hand; a record per image however often a sharded loader
repeats it; a class absent from masks and predictions is left out of the means."""

from __future__ import annotations

import math

import pytest
import torch

from visiontune.segment.inference import SegmentationEvaluator
from visiontune.segment.metrics import pixel_confusion, segmentation_scores

IGNORE = 255
NAMES = ["background", "cat", "dog", "bird"]

# A 3 x 4 mask with two ignored pixels, and a prediction. Pixel by pixel (true -> predicted):
# row 0: 0->0  0->0  1->1  1->2
# row 1: 0->1  1->1  1->1  IGNORE (predicted 2: not counted)
# row 2: 2->2  2->2  2->0  IGNORE (predicted 0: not counted)
TARGET = torch.tensor([[0, 0, 1, 1], [0, 1, 1, IGNORE], [2, 2, 2, IGNORE]])
PRED = torch.tensor([[0, 0, 1, 2], [1, 1, 1, 2], [2, 2, 0, 0]])
HAND = [  # rows: true class, columns: predicted; bird (3) appears in neither
    [2, 1, 0, 0],
    [0, 3, 1, 0],
    [1, 0, 2, 0],
    [0, 0, 0, 0],
]


def test_confusion_matrix_skips_ignored_pixels():
    assert pixel_confusion(PRED, TARGET, 4, IGNORE).tolist() == HAND


def test_scores_match_the_hand_computed_ones():
    report = segmentation_scores(torch.tensor(HAND), NAMES)
    # IoU = TP / (TP + FP + FN): background 2 / (2 + 1 + 1), cat 3 / (3 + 1 + 1), dog 2 / (2 + 1 + 1); bird absent
    iou = [2 / 4, 3 / 5, 2 / 4]
    dice = [4 / 6, 6 / 8, 4 / 6]  # 2TP / (2TP + FP + FN)
    metrics = report["metrics"]
    assert metrics["miou"] == pytest.approx(sum(iou) / 3)
    assert metrics["mean_dice"] == pytest.approx(sum(dice) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(7 / 10)  # 10 counted pixels, 7 right
    per_class = {c["label"]: c for c in report["per_class_iou"]}
    assert [per_class[n]["iou"] for n in NAMES[:3]] == pytest.approx(iou)
    assert per_class["bird"]["iou"] is None and per_class["bird"]["pixels"] == 0
    assert report["confusion_matrix"] == HAND and report["class_names"] == NAMES


def test_the_ignore_index_counts_nowhere_whatever_is_predicted_there():
    other = PRED.clone()
    other[TARGET == IGNORE] = 3  # predicting a class on ignored pixels is neither a hit nor a false positive
    assert pixel_confusion(other, TARGET, 4, IGNORE).tolist() == HAND


def _record(evaluator: SegmentationEvaluator, index: int) -> dict:
    logits = torch.nn.functional.one_hot(PRED, 4).permute(2, 0, 1).float() * 5
    return evaluator._record(logits, TARGET, index)


def test_evaluator_counts_each_image_once_and_reports_the_loss_per_counted_pixel():
    evaluator = SegmentationEvaluator(NAMES, IGNORE)
    records = [_record(evaluator, 0), _record(evaluator, 1), _record(evaluator, 0)]  # image 0 repeated by a shard
    metrics = evaluator(records)
    assert evaluator.last["confusion_matrix"] == (2 * torch.tensor(HAND)).tolist()
    assert metrics["miou"] == pytest.approx((2 / 4 + 3 / 5 + 2 / 4) / 3)
    logits = torch.nn.functional.one_hot(PRED, 4).permute(2, 0, 1).float() * 5
    expected = torch.nn.functional.cross_entropy(logits[None], TARGET[None], ignore_index=IGNORE)
    assert metrics["loss"] == pytest.approx(float(expected))
    assert [s["index"] for s in evaluator.last["samples"]] == [0, 1] and evaluator.last["images"] == 2
    assert math.isfinite(metrics["loss"])
