"""visiontune.json: one schema with a version for every saved model; damaged or newer files get one sentence."""

import json

import pytest

from visiontune.core.errors import ModelError
from visiontune.core.manifest import FORMAT_VERSION, read_manifest, write_manifest


def test_round_trip_carries_format_and_kind(tmp_path):
    write_manifest(tmp_path, "classifier", class_names=["a", "b"])
    assert read_manifest(tmp_path) == {"format": FORMAT_VERSION, "kind": "classifier", "class_names": ["a", "b"]}


def test_missing_is_empty_and_damaged_or_newer_is_one_sentence(tmp_path):
    assert read_manifest(tmp_path) == {}
    (tmp_path / "visiontune.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "visiontune.json").write_text(json.dumps({"format": FORMAT_VERSION + 1, "kind": "classifier"}))
    with pytest.raises(ModelError, match="upgrade visiontune"):
        read_manifest(tmp_path)


def test_every_saved_classifier_and_dual_encoder_uses_the_schema(fixtures_dir, tmp_path):
    from visiontune.classify.resolve import resolve_classifier
    from visiontune.clip.dual_encoder import resolve_dual_encoder

    resolve_classifier(str(fixtures_dir / "timm-vit"), ["x", "y"]).save(tmp_path / "clf")
    resolve_dual_encoder(str(fixtures_dir / "clip")).save(tmp_path / "dual")
    assert read_manifest(tmp_path / "clf")["kind"] == "classifier"
    assert read_manifest(tmp_path / "dual")["kind"] == "dual_encoder"
    assert {read_manifest(tmp_path / d)["format"] for d in ("clf", "dual")} == {FORMAT_VERSION}
    assert resolve_classifier(str(tmp_path / "clf")).class_names == ["x", "y"]
