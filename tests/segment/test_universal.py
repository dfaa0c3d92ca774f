"""Mask2Former in semantic mode under `task: segment` (tiny random Mask2Former from a config): the library's own loss
on the targets its image processor builds, masks equal to its processor's semantic post-processing, a trained run's
export read back by plain transformers with the same masks, and the refusals (LoRA, dice_ce, other universal types)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visiontune.core.errors import ModelError
from visiontune.segment.model import build_segmenter
from visiontune.segment.task import predict_mask
from visiontune.testing.fixtures import tiny_hf_mask2former
from visiontune.testing.segment_fixtures import CLASSES, IGNORE, write_segmentation_sets

SIZE = 64  # a multiple of 32: Mask2Former's processor rounds its resize up to one


@pytest.fixture(scope="module")
def mask2former(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_hf_mask2former(tmp_path_factory.mktemp("m2f") / "mask2former", image_size=SIZE)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    return write_segmentation_sets(tmp_path_factory.mktemp("masks"))


def _labels() -> torch.Tensor:
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    labels[0, 8:30, 10:40], labels[0, 40:60, 5:20], labels[1, 20:50, 20:50] = 1, 3, 2
    labels[:, :6, :] = IGNORE
    return labels


def test_the_loss_is_the_librarys_on_the_targets_its_image_processor_builds(mask2former):
    from transformers import AutoImageProcessor

    model = build_segmenter(str(mask2former), CLASSES, image_size=SIZE, ignore_index=IGNORE)
    assert model.universal and model.net.class_predictor.out_features == len(CLASSES) + 1  # + "no object"
    assert model.backbone_names() and all(".pixel_level_module.encoder." in n for n in model.backbone_names())
    assert any(n.startswith("net.class_predictor.") for n in model.decoder_names())
    pixels, labels = torch.rand(2, 3, SIZE, SIZE), _labels()
    torch.manual_seed(1)  # the matched loss samples points at random
    ours = model(pixels, labels)
    assert ours["logits"].shape == (2, len(CLASSES), SIZE, SIZE)

    processor = AutoImageProcessor.from_pretrained(mask2former)
    images = [(p * 255).round().to(torch.uint8) for p in pixels]
    batch = processor(images=images, segmentation_maps=list(labels), ignore_index=IGNORE, return_tensors="pt")
    assert [c.tolist() for c in batch["class_labels"]] == [[0, 1, 3], [0, 2]]  # the ignore label is in no mask
    torch.manual_seed(1)
    theirs = model.net(
        pixel_values=batch["pixel_values"], mask_labels=batch["mask_labels"], class_labels=batch["class_labels"]
    )
    torch.testing.assert_close(ours["loss"], theirs.loss, rtol=2e-3, atol=2e-3)  # pixels rounded to uint8 there

    nothing = model(pixels, torch.full_like(labels, IGNORE))["loss"]
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad


def test_masks_are_the_image_processors_semantic_post_processing(mask2former):
    model = build_segmenter(str(mask2former), CLASSES, image_size=SIZE).eval()
    pixels = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        outputs = model.net(pixel_values=model._normalized(pixels))
        theirs = model.processor.post_process_semantic_segmentation(outputs, target_sizes=[(40, 50), (40, 50)])
        ours = model.logits(pixels, (40, 50))
    assert torch.equal(ours.argmax(1), torch.stack(theirs))


def test_refusals(mask2former, tmp_path):
    from transformers import DetrConfig

    from visiontune.segment.model import apply_lora

    model = build_segmenter(str(mask2former), CLASSES, image_size=SIZE)
    with pytest.raises(ModelError, match="Mask2Former / MaskFormer"):
        apply_lora(model, None)
    DetrConfig(use_timm_backbone=False).save_pretrained(tmp_path / "detr")
    with pytest.raises(ModelError, match="a detr checkpoint is a universal segmentation model"):
        build_segmenter(str(tmp_path / "detr"), CLASSES)


def test_trains_from_a_recipe_and_plain_transformers_reads_the_export(mask2former, sets, write_recipe, cli, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    run = tmp_path / "run"
    recipe = {
        "task": "segment",
        "model": str(mask2former),
        "output_dir": str(run),
        "data": {"train": str(sets["ids"]), "val": str(sets["ids"]), "image_size": SIZE, "workers": 0},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "logging_steps": 1},
    }
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    after = json.loads((run / "eval" / "after.json").read_text())
    assert 0 < after["metrics"]["loss"] < 10 and 0 <= after["metrics"]["miou"] <= 1

    plain = AutoModelForUniversalSegmentation.from_pretrained(run / "model").eval()
    processor = AutoImageProcessor.from_pretrained(run / "model")
    assert plain.config.id2label == dict(enumerate(CLASSES)) and processor.ignore_index == IGNORE
    ours = build_segmenter(str(run / "model"), None).eval()
    assert ours.universal and ours.class_names == CLASSES
    image = Image.open(sorted((sets["ids"] / "images" / "val").iterdir())[0]).convert("RGB").resize((SIZE, SIZE))
    with torch.no_grad():
        outputs = plain(**processor(images=image, return_tensors="pt"))
    theirs = processor.post_process_semantic_segmentation(outputs, target_sizes=[(SIZE, SIZE)])[0]
    agree = (theirs == torch.from_numpy(predict_mask(ours, image))).float().mean()
    assert agree > 0.99  # the processor normalises uint8 pixels in one fused step: a near-tie pixel may flip

    recipe["train"]["loss"] = "dice_ce"
    recipe["output_dir"] = str(tmp_path / "dice")
    code, _, err = cli("train", write_recipe(recipe, "dice.yaml"))
    assert code != 0 and "dice_ce needs per-pixel logits" in err
