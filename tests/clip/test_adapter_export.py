"""LoRA adapters written by visiontune load with plain PEFT onto the model class a user has: `CLIPModel` and
`CLIPVisionModel` for clip_classify, the plain timm / transformers classifier for classify."""

import pytest
import torch

from visiontune.clip.dual_encoder import image_features, resolve_dual_encoder
from visiontune.clip.zero_shot import CLIPClassifier

NAMES = ["cat", "dog", "car"]


def _randomise_lora(model: torch.nn.Module) -> None:
    """A trained-looking adapter (lora_B starts at zero), so a silently unloaded adapter cannot pass."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_dual_encoder_adapters_load_onto_plain_models(family, fixtures_dir, tmp_path):
    """`adapter/` onto CLIPModel / SiglipModel, `adapter/vision/` onto CLIPVisionModel / SiglipVisionModel."""
    import transformers
    from peft import PeftModel

    from visiontune.clip.config import ClipLoraConfig
    from visiontune.clip.vision_lora import apply_vision_lora

    full_class, vision_class = {
        "clip": (transformers.CLIPModel, transformers.CLIPVisionModel),
        "siglip": (transformers.SiglipModel, transformers.SiglipVisionModel),
    }[family]
    base = str(fixtures_dir / family)
    clf = CLIPClassifier(resolve_dual_encoder(base), NAMES, "builtin")
    apply_vision_lora(clf, ClipLoraConfig(r=4, dropout=0.0), linearize=False)
    _randomise_lora(clf.vision)
    clf.eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = clf.vision(pixels)  # projected image embeddings, LoRA active
        ours_pooled = clf.encoder.model.vision_model(pixel_values=pixels).pooler_output
    clf.save(tmp_path / "model", adapter_dir=tmp_path / "adapter")

    with torch.no_grad():
        plain = PeftModel.from_pretrained(full_class.from_pretrained(base), tmp_path / "adapter").eval()
        torch.testing.assert_close(image_features(plain, pixels), ours, rtol=0, atol=1e-5)
        original = image_features(full_class.from_pretrained(base).eval(), pixels)
        assert not torch.allclose(original, ours, atol=1e-3)  # the adapter does change the embeddings

        tower = PeftModel.from_pretrained(vision_class.from_pretrained(base), tmp_path / "adapter" / "vision")
        torch.testing.assert_close(tower.eval()(pixel_values=pixels).pooler_output, ours_pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("kind", "targets"), [("timm-vit", "auto"), ("hf-vit", "auto")])
def test_classify_adapter_loads_onto_the_plain_library_model(kind, targets, fixtures_dir, tmp_path):
    """`adapter/` holds the LoRA matrices and the new head; the user's base is the source model at the new class
    count."""
    from peft import PeftModel

    from visiontune.classify.config import LoraConfig
    from visiontune.classify.lora import apply_lora
    from visiontune.classify.resolve import resolve_classifier

    source = fixtures_dir / kind
    model = resolve_classifier(str(source), NAMES)
    apply_lora(model, LoraConfig(r=4, dropout=0.0, target_modules=targets))
    _randomise_lora(model)
    model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixels)["logits"]
    model.save(tmp_path / "model", adapter_dir=tmp_path / "adapter")

    if kind.startswith("timm"):
        import timm

        base = timm.create_model(f"local-dir:{source}", pretrained=True, num_classes=len(NAMES))
    else:
        from transformers import AutoModelForImageClassification

        base = AutoModelForImageClassification.from_pretrained(
            source, num_labels=len(NAMES), ignore_mismatched_sizes=True
        )
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        out = plain(pixels) if kind.startswith("timm") else plain(pixel_values=pixels).logits
    torch.testing.assert_close(out, ours, rtol=0, atol=1e-5)
