"""`visiontune predict` for dual encoders: zero-shot over the labels typed with --labels (or a clip_classify model's
saved classes); options of other kinds of model are refused in one sentence."""

from __future__ import annotations

import pytest
import torch
from PIL import Image


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (48, 36), (200, 40, 40)).save(path)
    return str(path)


def test_labels_make_the_zero_shot_head(cli, fixtures_dir, image, monkeypatch):
    import visiontune.clip.zero_shot as zero_shot
    from visiontune.clip.classify import load_clip_classifier
    from visiontune.core.transforms import eval_transform

    heads: list[list[str]] = []
    real = zero_shot.zero_shot_head
    monkeypatch.setattr(
        zero_shot, "zero_shot_head", lambda enc, names, t: heads.append(list(names)) or real(enc, names, t)
    )
    # a plain CLIP folder: predict picks the dual-encoder task from its config, no --task needed
    code, out, err = cli("predict", fixtures_dir / "clip", image, "--labels", "red, green ,blue,", "--top-k", "2")
    assert code == 0, err
    assert heads == [["red", "green", "blue"]]
    lines = out.strip().splitlines()
    rows = lines[lines.index(image) :]  # after any library notice printed on import
    assert len(rows) == 3  # the image, then top-2
    printed = {line.split()[-1]: float(line.split()[0].rstrip("%")) / 100 for line in rows[1:]}
    clf = load_clip_classifier(str(fixtures_dir / "clip"), ["red", "green", "blue"]).eval()
    with torch.inference_mode():
        probs = clf(eval_transform(clf.preprocess)(Image.open(image))[None])["logits"].softmax(-1)[0]
    for label, prob in printed.items():
        assert prob == pytest.approx(probs[["red", "green", "blue"].index(label)].item(), abs=5e-5)


def test_contrastive_needs_labels_and_other_kinds_refuse_them(cli, fixtures_dir, image):
    code, _, err = cli("predict", fixtures_dir / "clip", image, "--task", "clip_contrastive")
    assert code == 2 and "--labels" in err and "Traceback" not in err
    code, _, err = cli("predict", fixtures_dir / "timm-vit", image, "--labels", "a,b")
    assert code == 2 and "--labels is an option of dual encoders" in err and "classify" in err
    code, _, err = cli("predict", fixtures_dir / "timm-vit", image, "--prompt", "What is it?")
    assert code == 2 and "--prompt is an option of VLMs" in err
