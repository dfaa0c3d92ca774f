"""clip_contrastive on tiny CLIP / SigLIP fixtures and generated captioned images: caption readers and bad pairs,
the split by image, the InfoNCE loss against a hand computation, trainable parts, and an end-to-end CLI run."""

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import fixture_seed
from visiontune.clip.captions import (
    DIGIT_WORDS,
    CaptionedImages,
    clean_pairs,
    load_image,
    read_captions,
    split_by_image,
)
from visiontune.clip.contrastive import ContrastiveModel, set_trainable
from visiontune.clip.dual_encoder import resolve_dual_encoder
from visiontune.core.errors import DataError, ModelError
from visiontune.testing.fixtures import image_folder, tiny_clip, tiny_siglip

COLOURS = ["red", "green", "blue"]  # class c of `image_folder` is tinted with channel c; words the tokenizer knows
PHRASES = ["a {} image with stripes", "a photo of a {} image", "this is a {} picture"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dual")
    with fixture_seed():
        return {"clip": tiny_clip(root / "clip"), "siglip": tiny_siglip(root / "siglip")}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("captioned") / "images", classes=3, per_class=8)


def _rows(images: Path, captions_per_image: int = 2) -> list[dict]:
    rows = []
    for c, colour in enumerate(COLOURS):
        for file in sorted((images / f"class_{c}").glob("*.png")):
            for phrase in PHRASES[:captions_per_image]:
                rows.append({"image": f"{file.parent.name}/{file.name}", "caption": phrase.format(colour)})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_and_jsonl_readers_group_captions_by_image(images, tmp_path):
    rows = _rows(images)
    for pairs in (read_captions(str(_write_csv(images / "c.csv", rows))), _read_jsonl(images / "c.jsonl", rows)):
        assert len(pairs) == 48 and len(pairs.images()) == 24
        assert pairs.sources[0] == (images / "class_0" / "000.png").resolve()
        assert pairs.captions[:2] == ["a red image with stripes", "a photo of a red image"]
        assert load_image(pairs, 0, 10**8).size == (32, 32)
    # Paths relative to data.image_root instead of the file's folder.
    moved = read_captions(str(_write_csv(tmp_path / "elsewhere.csv", rows)), image_root=str(images))
    assert moved.sources[0] == (images / "class_0" / "000.png").resolve()


def _read_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps({"path": r["image"], "caption": r["caption"]}) + "\n" for r in rows))
    return read_captions(str(path))


def test_coco_captions_json_several_captions_per_image(images):
    files = sorted(images.rglob("*.png"))[:4]
    doc = {
        "images": [{"id": 10 + k, "file_name": str(f.relative_to(images.parent))} for k, f in enumerate(files)],
        "annotations": [{"image_id": 10 + k, "caption": p.format("red")} for k in range(4) for p in PHRASES],
    }
    path = images.parent / "coco.json"
    path.write_text(json.dumps(doc))
    pairs = read_captions(str(path))
    assert len(pairs) == 12 and [len(g) for g in pairs.images()] == [3, 3, 3, 3]
    assert pairs.image_index()[:4] == [0, 0, 0, 1]
    doc["annotations"].append({"image_id": 99, "caption": "a red image"})
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotations\[12\] refers to image_id 99"):
        read_captions(str(path))


def test_saved_dataset_reader(images, tmp_path):
    import datasets

    files = sorted(images.rglob("*.png"))[:3]
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "text": [["a red image", "a photo of a red image"], ["a blue image"], ["x"]]}
    )
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    pairs = read_captions(str(tmp_path / "ds"))
    assert pairs.kind == "hf" and len(pairs) == 4 and [len(g) for g in pairs.images()] == [2, 1, 1]
    assert pairs.captions[1] == "a photo of a red image" and load_image(pairs, 3, 10**8).size == (32, 32)


def test_bad_pairs_name_the_record_or_are_skipped_and_counted(images):
    rows = _rows(images, 1)[:6]
    rows[2]["caption"] = "  "
    rows[3]["image"] = "class_0/missing.png"
    path = _write_csv(images / "bad.csv", rows)
    with pytest.raises(
        DataError,
        match=r"2 bad train pair\(s\).*bad.csv line 4 has an empty caption; .*bad.csv "
        r"line 5 image missing.png file not found.*on_bad_sample=skip",
    ):
        clean_pairs(read_captions(str(path)), "error", 10**8, "train")
    kept, bad = clean_pairs(read_captions(str(path)), "skip", 10**8, "train")
    assert len(kept) == 4 and [b.ref.rsplit(" ", 1)[-1] for b in bad] == ["4", "5"]


def test_split_by_image_keeps_captions_together(images):
    pairs = read_captions(str(_write_csv(images / "three.csv", _rows(images, 3))))
    train, val = split_by_image(pairs, 0.25, seed=3)
    assert len(val.images()) == 6 and len(train.images()) == 18 and len(train) + len(val) == len(pairs)
    assert not set(train.image_ids) & set(val.image_ids)
    assert all(len(g) == 3 for g in train.images() + val.images())
    assert split_by_image(pairs, 0.25, seed=3)[1].image_ids == val.image_ids
    with pytest.raises(DataError, match="data.val_split=0.01 leaves no train or no val images"):
        split_by_image(pairs, 0.01, seed=3)


def test_one_caption_per_image_per_epoch_is_deterministic(images):
    pairs = read_captions(str(_write_csv(images / "three.csv", _rows(images, 3))))
    ds = CaptionedImages(pairs, lambda image: torch.zeros(1), 10**8, seed=0)
    assert len(ds) == 24
    epoch0 = [ds.caption_index(i) for i in range(24)]
    ds.set_epoch(1)
    epoch1 = [ds.caption_index(i) for i in range(24)]
    assert epoch0 != epoch1 and all(pairs.image_index()[j] == i for i, j in enumerate(epoch1))
    ds.set_epoch(0)
    assert [ds.caption_index(i) for i in range(24)] == epoch0


def test_builtin_mnist_captions_are_seeded_and_disjoint_from_heldout(monkeypatch):
    import visiontune.core.assets as assets

    digits, labels, names = assets.load_digit_arrays("mnist-5k")  # one real load (~4 s); the parts are cut from it
    train_part, heldout_part = (assets._mnist_part(digits, labels, heldout=h) for h in (False, True))
    assert len(train_part[0]) == 4000 and len(heldout_part[0]) == 1000 and heldout_part[1].tolist().count(7) == 100
    trained = {hashlib.sha1(a.tobytes()).digest() for a in train_part[0]}
    assert not any(hashlib.sha1(a.tobytes()).digest() in trained for a in heldout_part[0])

    monkeypatch.setattr(assets, "load_digit_arrays", lambda name: (*train_part, names))
    pairs = read_captions("builtin:mnist-5k-captions", seed=1)
    assert len(pairs.images()) == 4000 and len(pairs) == 12000
    assert pairs.captions == read_captions("builtin:mnist-5k-captions", seed=1).captions
    assert pairs.captions != read_captions("builtin:mnist-5k-captions", seed=2).captions
    assert len(set(pairs.captions)) > 40
    assert all(DIGIT_WORDS[y] in c or str(y) in c for c, y in zip(pairs.captions[::3], train_part[1], strict=True))


def test_info_nce_matches_hand_computation(models):
    encoder = resolve_dual_encoder(str(models["clip"]))
    model = ContrastiveModel(encoder).eval()
    pixels = torch.randn(3, 3, 32, 32)
    tokens = encoder.tokenize(["a red image", "a photo of a blue image", "this is a green picture"])
    with torch.no_grad():
        out = model(pixels, tokens["input_ids"], tokens["attention_mask"])
        image = F.normalize(encoder.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(encoder.model.get_text_features(**tokens).pooler_output, dim=-1)
    sims = (encoder.model.logit_scale.exp() * image @ text.T).tolist()
    rows = [math.log(sum(math.exp(v) for v in sims[i])) - sims[i][i] for i in range(3)]
    cols = [math.log(sum(math.exp(sims[j][i]) for j in range(3))) - sims[i][i] for i in range(3)]
    assert out["loss"].item() == pytest.approx((sum(rows) / 3 + sum(cols) / 3) / 2, rel=1e-5)
    torch.testing.assert_close(out["logits"], torch.tensor(sims))
    # Captions given in another order: labels say which caption belongs to each image; the loss is unchanged.
    perm = torch.tensor([2, 0, 1])
    shuffled = {k: v[torch.argsort(perm)] for k, v in tokens.items()}  # caption perm[i] of the batch is image i's
    with torch.no_grad():
        assert model(pixels, **shuffled, labels=perm)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-5)
    with torch.no_grad():
        encoder.model.logit_scale.fill_(math.log(1000.0))  # CLIP clamps the temperature at 100
        assert model(pixels, **tokens)["logits"].abs().max() <= 100.0 + 1e-4


def test_trainable_parts_and_frozen_towers(models):
    encoder = resolve_dual_encoder(str(models["clip"]))
    model = ContrastiveModel(encoder)
    set_trainable(encoder.model, "projections", "tiny-clip")
    trained = {n.split(".")[0] for n, p in encoder.model.named_parameters() if p.requires_grad}
    assert trained == {"visual_projection", "text_projection", "logit_scale"}
    model.train()
    assert not encoder.model.vision_model.training and not encoder.model.text_model.training
    set_trainable(encoder.model, "vision", "tiny-clip")
    model.train()
    assert encoder.model.vision_model.training and not encoder.model.text_model.training
    siglip = resolve_dual_encoder(str(models["siglip"]))
    with pytest.raises(ModelError, match="no separate projection layers.*set trainable to both, vision or text"):
        set_trainable(siglip.model, "projections", "tiny-siglip")
    set_trainable(siglip.model, "text", "tiny-siglip")
    tokens = siglip.tokenize(["a red image", "a blue image"])
    loss = ContrastiveModel(siglip)(torch.randn(2, 3, 32, 32), **tokens)["loss"]
    loss.backward()
    assert siglip.model.text_model.head.weight.grad is not None and siglip.model.vision_model.head.probe.grad is None


def test_cli_train_writes_model_evals_and_report(models, images, cli, write_recipe, tmp_path):
    captions = _write_csv(images / "train.csv", _rows(images, 3))
    run = tmp_path / "run"
    recipe = write_recipe(
        {
            "task": "clip_contrastive",
            "model": str(models["clip"]),
            "output_dir": str(run),
            "trainable": "both",
            "data": {
                "train": str(captions),
                "val_split": 0.25,
                "workers": 0,
                "zero_shot": str(images),
                "zero_shot_class_names": COLOURS,
                "templates": ["a photo of a {} image", "a {} picture"],
            },
            "train": {"epochs": 2, "batch_size": 6, "lr": 1e-3, "logging_steps": 1, "warmup_ratio": 0.0},
        }
    )
    code, out, err = cli("train", recipe)
    assert code == 0, err
    for name in ("before", "after"):
        metrics = json.loads((run / "eval" / f"{name}.json").read_text())["metrics"]
        assert {
            "i2t_R@1",
            "i2t_R@5",
            "i2t_R@10",
            "t2i_R@1",
            "t2i_R@10",
            "mean_recall",
            "loss",
            "zero_shot_accuracy",
        } <= set(metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == 18 and summary["val_pairs"] == 18 and summary["global_step"] == 6
    assert "mean_recall" in (run / "report.md").read_text() and (run / "metrics.jsonl").is_file()

    # The saved encoder reloads through the resolver and embeds exactly like the best checkpoint's weights.
    from safetensors.torch import load_file

    saved = resolve_dual_encoder(str(run / "model"))
    best = resolve_dual_encoder(str(models["clip"]))
    state = load_file(str(Path(summary["best_checkpoint"]) / "model.safetensors"))
    best.model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    pixels, texts = torch.randn(2, 3, 32, 32), ["a red image with stripes", "a blue picture"]
    with torch.no_grad():
        for encoder in (saved, best):
            encoder.model.eval()
        torch.testing.assert_close(saved.encode_images(pixels), best.encode_images(pixels), rtol=0, atol=0)
        torch.testing.assert_close(saved.encode_texts(texts), best.encode_texts(texts), rtol=0, atol=0)

    code, out, err = cli("eval", run, "--task", "clip_contrastive", "--data", captions)
    assert code == 0, err
    assert "mean_recall" in out and (run / "eval" / "cli" / "predictions.csv").is_file()
    image = str(next(images.rglob("*.png")))
    code, _, err = cli("predict", run, image, "--task", "clip_contrastive")  # no classes of its own
    assert code == 2 and "--labels" in err
    code, out, err = cli("predict", run, image, "--labels", "red,blue")  # zero-shot over typed labels
    assert code == 0, err
    assert "red" in out and "blue" in out


def test_metric_defaults_to_mean_recall_and_rejects_classifier_metrics():
    from visiontune.core.errors import RecipeError
    from visiontune.recipe import parse_config

    raw = {"task": "clip_contrastive", "model": "m", "output_dir": "o", "data": {"train": "t.csv"}}
    assert parse_config({**raw, "train": {"epochs": 1}}).train.metric == "mean_recall"
    assert parse_config({**raw, "train": {"metric": "t2i_R@5"}}).train.metric == "t2i_R@5"
    with pytest.raises(RecipeError, match="train.metric `accuracy` is not a validation metric of clip_contrastive"):
        parse_config({**raw, "train": {"metric": "accuracy"}})
