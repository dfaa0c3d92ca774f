"""One resolver for every model source; heads resized; save -> reload gives the same logits; layer groups."""

import pytest
import torch

from visiontune.classify.layers import layer_groups, trainable_names
from visiontune.classify.resolve import resolve_classifier
from visiontune.core.errors import ModelError
from visiontune.run.optim import build_optimizer, layer_decay_scales

KINDS = ["timm-vit", "timm-cnn", "hf-vit"]


@pytest.mark.parametrize("kind", KINDS)
def test_resolve_resizes_head_and_keeps_labels(kind, fixtures_dir):
    model = resolve_classifier(str(fixtures_dir / kind), ["cat", "dog"]).eval()
    assert model.class_names == ["cat", "dog"]
    assert model(torch.randn(2, 3, 32, 32))["logits"].shape == (2, 2)
    assert model.preprocess.image_size == 32


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload_give_identical_logits(kind, fixtures_dir, tmp_path):
    model = resolve_classifier(str(fixtures_dir / kind), ["a", "b", "c", "d"]).eval()
    model.save(tmp_path / "saved")
    again = resolve_classifier(str(tmp_path / "saved")).eval()
    assert again.class_names == ["a", "b", "c", "d"] and again.kind == model.kind
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], again(x)["logits"])


def test_timm_prefix_reaches_local_dir(fixtures_dir):
    model = resolve_classifier(f"timm:local-dir:{fixtures_dir / 'timm-vit'}", ["x", "y"])
    assert model.kind == "timm" and model.backbone.num_classes == 2


def test_builtin_efficientnet_lite0_is_the_packaged_imagenet_model():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from visiontune.core.transforms import eval_transform

    model = resolve_classifier("builtin:efficientnet-lite0", ["0", "1"])
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.std == (0.5, 0.5, 0.5)
    assert sum(p.numel() for p in model.backbone.parameters()) == 3_373_570
    full = resolve_classifier("builtin:efficientnet-lite0").eval()
    assert len(full.class_names) == 1000
    # Real ImageNet weights recognise scikit-learn's two real photos (a temple, a flower).
    china, flower = load_sample_images().images
    expected = [{"palace", "monastery", "bell cote, bell cot"}, {"daisy"}]
    for photo, labels in zip((china, flower), expected, strict=True):
        with torch.no_grad():
            logits = full(eval_transform(full.preprocess)(Image.fromarray(photo))[None])["logits"][0]
        top3 = {full.class_names[i] for i in logits.topk(3).indices.tolist()}
        assert top3 & labels, top3


@pytest.mark.parametrize("name", ["timm:not_a_model_xyz", "org/absent-model", "builtin:nope", "/no/such/folder"])
def test_unresolvable_names_raise_model_error(name):
    with pytest.raises(ModelError):
        resolve_classifier(name, ["a", "b"])


@pytest.mark.parametrize("kind", KINDS)
def test_layer_groups_partition_parameters_in_order(kind, fixtures_dir):
    model = resolve_classifier(str(fixtures_dir / kind), ["a", "b"])
    groups, head = layer_groups(model)
    names = [n for n, _ in model.named_parameters()]
    flat = [n for g in groups for n in g] + head
    assert sorted(flat) == sorted(names), "every parameter in exactly one group"
    assert len(groups) >= 3 and head and all("head" in n or "classifier" in n for n in head)
    assert trainable_names(groups, head, 0) == set(head)
    assert trainable_names(groups, head, 1) == set(head) | set(groups[-1])
    assert trainable_names(groups, head, "all") == set(names)


def test_layer_decay_and_no_decay_on_biases(fixtures_dir):
    model = resolve_classifier(str(fixtures_dir / "timm-vit"), ["a", "b"])
    groups, head = layer_groups(model)
    scales = layer_decay_scales(groups, head, 0.5)
    assert all(scales[n] == 1.0 for n in head)
    assert all(scales[n] == 0.5 ** len(groups) for n in groups[0])
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, layer_scales=scales)
    params = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = params[id(p)]
            assert group["lr"] == pytest.approx(1e-2 * scales[name])
            assert group["weight_decay"] == (0.0 if p.ndim <= 1 else 0.1)
