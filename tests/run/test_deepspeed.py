"""`train.deepspeed`: built-in names resolve to the packaged ZeRO configs, a path is taken as given, and a path that
leads nowhere is refused when the recipe is read (the wheel's copy is checked in tests/test_packaging.py)."""

import json
from pathlib import Path

import pytest

from visiontune.core.errors import RecipeError
from visiontune.recipe import find_recipe, load_recipe
from visiontune.run import arguments
from visiontune.run.config import DEEPSPEED, DEEPSPEED_DIR, TrainConfig, deepspeed_file


def test_builtin_names_resolve_to_the_packaged_zero_configs():
    assert DEEPSPEED == ["zero2", "zero3"]
    for name in DEEPSPEED:
        path = deepspeed_file(name)
        assert path == DEEPSPEED_DIR / f"{name}.json" and path.is_file()
        assert json.loads(path.read_text())["zero_optimization"]["stage"] == int(name[-1])
    assert DEEPSPEED_DIR.parent.parent == Path(arguments.__file__).resolve().parent.parent  # inside the package


def test_a_path_is_taken_as_given(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ds.json").write_text("{}")
    assert deepspeed_file("~/ds.json") == tmp_path / "ds.json"
    assert TrainConfig(deepspeed="~/ds.json").deepspeed == "~/ds.json"  # the recipe keeps what it said


def test_a_missing_path_is_refused_when_the_recipe_is_read(tmp_path):
    missing = tmp_path / "zero9.json"
    with pytest.raises(RecipeError) as err:
        load_recipe(find_recipe("mnist-efficientnet-lite0"), [f"train.deepspeed={missing}"])
    assert str(err.value).endswith(
        f"train.deepspeed: {missing} is neither a built-in DeepSpeed config (zero2, zero3) nor a file; give one of "
        "those names or the path of a DeepSpeed JSON config."
    )
    assert "\n" not in str(err.value)


def test_training_arguments_get_the_packaged_file(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(arguments, "TrainingArguments", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(arguments, "check_deepspeed", lambda cfg: None)  # the deepspeed package need not be here
    monkeypatch.setattr(arguments, "deepspeed_on_cpu", lambda: {"accelerator_config": "ours"})
    arguments.training_arguments(TrainConfig(deepspeed="zero3", cpu=True), tmp_path, 0, 0, [])
    assert seen["deepspeed"] == str(DEEPSPEED_DIR / "zero3.json")
    # on CPU: not use_cpu, which would take transformers past its DeepSpeed set-up (plain DDP, silently)
    assert seen["use_cpu"] is False and seen["accelerator_config"] == "ours"


def test_one_cpu_process_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # as if deepspeed were installed
    with pytest.raises(RecipeError, match=r"train.deepspeed on CPU needs several ranks: launch with `visiontune train"):
        arguments.check_deepspeed(TrainConfig(deepspeed="zero2"))
