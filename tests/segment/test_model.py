"""Segmenters: FPN / U-Net decoders on a timm backbone and a transformers SegFormer behind one forward (logits at the
labels' size, cross-entropy that skips the ignore index), the head replaced for the user's classes, what each tuning
method trains, and resize vs sliding-window inference."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from visiontune.core.errors import ModelError
from visiontune.recipe import parse_config
from visiontune.segment.export import save_segmenter
from visiontune.segment.inference import image_logits
from visiontune.segment.model import build_segmenter

CLASSES = ["background", "blue", "green", "red"]
IGNORE = 255


@pytest.fixture(scope="module")
def timm_source(fixtures_dir) -> str:
    return f"timm:local-dir:{fixtures_dir / 'timm-cnn'}"


def _labels(height: int, width: int, classes: int = 4) -> torch.Tensor:
    labels = torch.randint(0, classes, (2, height, width))
    labels[:, :5, :] = IGNORE
    return labels


@pytest.mark.parametrize("decoder", ["fpn", "unet"])
def test_decoders_give_logits_at_the_label_size_and_skip_ignored_pixels(timm_source, decoder):
    torch.manual_seed(0)
    model = build_segmenter(timm_source, CLASSES, decoder, 16, 32)
    pixels, labels = torch.rand(2, 3, 40, 48), _labels(40, 48)
    out = model(pixels, labels)
    assert out["logits"].shape == (2, 4, 40, 48)
    expected = F.cross_entropy(out["logits"], labels, ignore_index=IGNORE)
    torch.testing.assert_close(out["loss"], expected)
    counted = labels.clone()
    counted[labels == IGNORE] = 0  # the same pixels labelled: the loss must change, so the ignored ones were skipped
    assert not torch.isclose(model(pixels, counted)["loss"], out["loss"])
    nothing = torch.full_like(labels, IGNORE)
    empty = model(pixels, nothing)["loss"]
    assert float(empty.detach()) == 0.0 and empty.requires_grad  # 0/0 would be nan and poison the weights


def test_segformer_gets_a_new_head_for_the_classes_and_the_library_loss_skips_the_ignore_index(fixtures_dir):
    torch.manual_seed(0)
    model = build_segmenter(str(fixtures_dir / "segformer"), ["road", "sky"], ignore_index=IGNORE)
    assert model.library == "transformers" and model.class_names == ["road", "sky"] and model.image_size == 32
    assert model.net.config.id2label == {0: "road", 1: "sky"} and model.net.config.semantic_loss_ignore_index == IGNORE
    assert model.net.decode_head.classifier.out_channels == 2
    pixels, labels = torch.rand(2, 3, 32, 32), _labels(32, 32, classes=2)
    out = model(pixels, labels)
    assert out["logits"].shape == (2, 2, 32, 32)
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["logits"], labels, ignore_index=IGNORE))


def test_a_saved_decoder_keeps_its_classes_and_refuses_others(timm_source, tmp_path):
    save_segmenter(build_segmenter(timm_source, CLASSES, "unet", 16, 32), tmp_path / "model")
    loaded = build_segmenter(str(tmp_path / "model"), None)
    assert loaded.class_names == CLASSES and loaded.spec["decoder"] == "unet" and loaded.image_size == 32
    with pytest.raises(ModelError, match="start from its backbone"):
        build_segmenter(str(tmp_path / "model"), ["cat", "dog"])
    with pytest.raises(ModelError, match="AutoModelForSemanticSegmentation"):
        build_segmenter(str(_classifier_config(tmp_path)), CLASSES)


def _classifier_config(tmp_path):
    """A folder holding a config no semantic-segmentation class takes (an image classifier's)."""
    from transformers import ViTConfig

    ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "vit"
    )
    return tmp_path / "vit"


def _built(model: str, tmp_path, **tune):
    raw = {"task": "segment", "model": model, "output_dir": str(tmp_path / "run"), "data": {"train": "x"}, "tune": tune}
    return parse_config(raw)


def _trained(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_what_each_tuning_method_trains(timm_source, fixtures_dir, tmp_path):
    from visiontune.classify.freeze import backbone_plan
    from visiontune.segment.task import _apply_lora

    def plan(source, **tune):
        model = build_segmenter(source, CLASSES, "fpn", 16, 32)
        made = backbone_plan(model, _built(source, tmp_path, **tune), _apply_lora, set(model.decoder_names()), set())
        return model, made

    model, _ = plan(timm_source, method="linear_probe")
    assert _trained(model) == set(model.decoder_names()) and not any(n.startswith("net.body.") for n in _trained(model))
    model.train()
    frozen_norms = [m for n, m in model.named_modules() if n.startswith("net.body.") and "bn" in n.split(".")[-1]]
    assert frozen_norms and not any(m.training for m in frozen_norms)  # the pretrained statistics stay
    assert model.net.head[1].training  # the decoder's own norms train

    schedule = [{"epoch": 0, "blocks": 0}, {"epoch": 1, "blocks": 1}]
    model, made = plan(timm_source, method="gradual_unfreeze", unfreeze=schedule)
    groups, rest = model.layer_groups()
    assert rest == model.decoder_names() and groups[0][0].startswith("net.body.conv_stem")
    assert _trained(model) == set(rest)
    made.callbacks[0].apply(1)
    assert _trained(model) == set(rest) | set(groups[-1])
    assert made.include == {n for n, _ in model.named_parameters()}

    model, _ = plan(str(fixtures_dir / "segformer"), method="lora", lora={"r": 2, "alpha": 4})
    trained = _trained(model)
    assert trained and all("lora_" in n or ".decode_head." in n for n in trained)
    assert any("lora_" in n for n in trained) and any(".decode_head." in n for n in trained)


def test_sliding_windows_cover_the_image_and_equal_resize_at_the_window_size(timm_source):
    torch.manual_seed(0)
    model = build_segmenter(timm_source, CLASSES, "fpn", 16, 32).eval()
    square = torch.rand(3, 32, 32)
    with torch.no_grad():
        (slid,) = image_logits(model, [square], "slide", 2 / 3)
        (whole,) = image_logits(model, [square], "resize", 2 / 3)
    torch.testing.assert_close(slid, whole)
    calls = []
    real = model.logits
    model.logits = lambda x, size=None: calls.append(x.shape) or real(x, size)
    with torch.no_grad():
        (big,) = image_logits(model, [torch.rand(3, 50, 70)], "slide", 0.5)
        (small,) = image_logits(model, [torch.rand(3, 20, 24)], "slide", 0.5)
    assert big.shape == (4, 50, 70) and small.shape == (4, 20, 24)
    # windows of 32 every 16 px: rows at 0, 16, 18 and columns at 0, 16, 32, 38, in one batch; the small image pads
    assert calls == [(12, 3, 32, 32), (1, 3, 32, 32)]


def test_soft_dice_loss_is_zero_when_exact_ignores_the_ignore_index_and_weighs_small_classes():
    from visiontune.segment.model import soft_dice_loss

    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :2, :2] = 1  # a 4-pixel class on a 60-pixel background
    labels[0, 7, 7] = 255
    exact = F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 100
    assert soft_dice_loss(exact, labels, 255).item() == pytest.approx(0, abs=1e-6)
    wrong_at_ignored = exact.clone()
    wrong_at_ignored[0, :, 7, 7] = torch.tensor([0.0, 0.0, 100.0])  # a prediction where nothing counts
    assert soft_dice_loss(wrong_at_ignored, labels, 255).item() == pytest.approx(0, abs=1e-6)
    missed_small = exact.clone()
    missed_small[0, :, :2, :2] = torch.tensor([100.0, 0.0, 0.0]).view(3, 1, 1)  # the small class called background
    # 4 wrong pixels of 63, but the whole small class is lost: Dice of class 1 is 0, so the mean is at least 0.5
    assert soft_dice_loss(missed_small, labels, 255).item() > 0.5


def test_dice_ce_adds_the_dice_term_to_the_training_loss(timm_source):
    torch.manual_seed(0)
    model = build_segmenter(timm_source, ["bg", "a", "b"], "fpn", 8, 32).eval()
    pixels, labels = torch.rand(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    with torch.no_grad():
        plain = model(pixels, labels)["loss"]
        model.dice = True
        with_dice = model(pixels, labels)
    from visiontune.segment.model import soft_dice_loss

    expected = plain + soft_dice_loss(with_dice["logits"], labels, 255)
    assert with_dice["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
