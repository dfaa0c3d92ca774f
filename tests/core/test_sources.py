"""parse_source: one parser for `model:` / `vision:` / `language:` strings (no model is loaded here)."""

from pathlib import Path

import pytest

from visiontune.core.errors import ModelError
from visiontune.core.sources import ModelSource, parse_source, pretrained_config


def _model_folder(path: Path, marker: str = "config.json") -> Path:
    path.mkdir(parents=True)
    (path / marker).write_text("{}")
    return path


def test_builtin_model():
    assert parse_source("builtin:efficientnet-lite0", "model") == ModelSource(
        "builtin", "efficientnet-lite0", "builtin:efficientnet-lite0"
    )


@pytest.mark.parametrize("name", ["builtin:nope", "builtin:digits", "builtin:"])  # digits: a dataset, not a model
def test_unknown_builtin_is_refused_naming_the_key_and_the_models(name):
    with pytest.raises(ModelError, match=rf"^language: {name} is not a built-in model; .*'smollm2-135m-instruct'"):
        parse_source(name, "language")


def test_timm_name():
    assert parse_source("timm:resnet18", "model") == ModelSource("timm", "resnet18", "timm:resnet18")


def test_timm_local_dir_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = _model_folder(tmp_path / "vit")
    source = parse_source("timm:local-dir:~/vit", "vision")
    assert source == ModelSource("timm", f"local-dir:{folder}", "timm:local-dir:~/vit", folder)


def test_timm_local_dir_that_is_missing_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"^vision: timm:local-dir:.*absent cannot be resolved: there is no folder"):
        parse_source(f"timm:local-dir:{tmp_path / 'absent'}", "vision")


@pytest.mark.parametrize("marker", ["config.json", "visiontune.json"])
def test_folder(tmp_path, marker):
    folder = _model_folder(tmp_path / "m", marker)
    assert parse_source(str(folder), "model") == ModelSource("folder", str(folder), str(folder), folder)


def test_folder_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = _model_folder(tmp_path / "models" / "clip")
    source = parse_source("~/models/clip", "model")
    assert (source.kind, source.path, source.name, source.text) == ("folder", folder, str(folder), "~/models/clip")


def test_run_folder_resolves_to_its_model_subfolder(tmp_path):
    run = tmp_path / "run"
    inner = _model_folder(run / "model")
    (run / "config.yaml").write_text("task: classify\n")
    assert parse_source(str(run), "model").path == inner


def test_a_model_folder_with_a_model_subfolder_stays_itself(tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "model").mkdir()
    assert parse_source(str(folder), "model").path == folder


@pytest.mark.parametrize("key", ["model", "vision", "language"])
@pytest.mark.parametrize("text", ["/no/such/folder", "./absent", "~/absent-visiontune-model"])
def test_path_like_but_missing_is_refused_naming_the_key(text, key):
    with pytest.raises(ModelError, match=rf"^{key}: {text} cannot be resolved: there is no folder .*hub id"):
        parse_source(text, key)


def test_a_file_is_refused(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match=rf"^model: {weights} cannot be resolved: {weights} is a file"):
        parse_source(str(weights), "model")


def test_a_folder_without_model_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"^vision: .*empty cannot be resolved: .*holds no config.json or visiontune"):
        parse_source(str(tmp_path / "empty"), "vision")


@pytest.mark.parametrize("hub_id", ["openai/clip-vit-base-patch32", "gpt2"])
def test_hub_id_passes_through(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    assert parse_source(hub_id, "model") == ModelSource("hub", hub_id, hub_id)


def test_a_config_that_cannot_be_read_is_refused_in_one_sentence():
    # no such hub id: offline (no cache) and online (no repository) alike transformers raises OSError
    with pytest.raises(ModelError, match=r"^language: nobody/nothing cannot be resolved offline \(.*\); give a dir\.$"):
        pretrained_config("nobody/nothing", "language", "nobody/nothing", "a dir")
