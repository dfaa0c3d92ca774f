"""The task registry: every entry is complete and consistent, and a task added as one entry (plus its own module)
is read by the recipe loader, the report and the fixtures without touching them."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from visiontune.registry import TASKS, ReportLabels, Smoke, TaskSpec
from visiontune.testing.fixtures import DATA_FIXTURES, MODEL_FIXTURES


@pytest.mark.parametrize("name", sorted(TASKS))
def test_entry_names_its_own_config_and_task(name):
    spec = TASKS[name]
    assert spec.config_class().model_fields["task"].default == name
    assert spec.create().name == name


@pytest.mark.parametrize("name", sorted(TASKS))
def test_smoke_fixtures_exist(name):
    smoke = TASKS[name].smoke
    assert smoke.model == "" or smoke.model in MODEL_FIXTURES
    assert {smoke.data, *smoke.data_by_stage.values()} <= set(DATA_FIXTURES)


TOY_MODULE = """
from typing import Literal

from visiontune.run.config import Strict, TrackConfig, TrainConfig
from visiontune.run.task import Task


class ToyConfig(Strict):
    task: Literal["toy"] = "toy"
    model: str
    output_dir: str
    size: int = 3
    train: TrainConfig = TrainConfig()
    track: TrackConfig = TrackConfig()

    def validation_metrics(self) -> list[str]:
        return ["loss", "accuracy"]


class ToyTask(Task):
    name = "toy"
"""


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    """A task that exists only as a module of its own and one registry entry."""
    (tmp_path / "toy_family.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = TaskSpec(
        config="toy_family:ToyConfig",
        task="toy_family:ToyTask",
        smoke=Smoke(model="image_classifier", data="images"),
        report=ReportLabels("untrained", "of the toy before training", {"loss": "toy loss"}),
    )
    monkeypatch.setitem(TASKS, "toy", spec)
    yield spec
    sys.modules.pop("toy_family", None)


def test_a_new_task_is_one_registry_entry(toy_task, tmp_path, write_recipe, cli):
    from visiontune.recipe import get_task
    from visiontune.report import write_report

    recipe = write_recipe({"task": "toy", "model": "timm:resnet18", "output_dir": str(tmp_path / "run")})
    code, _, err = cli("validate", recipe)
    assert code == 0, err
    code, _, err = cli("validate", recipe, "sizes=4")
    assert code == 2 and "size" in err  # the toy schema's own keys, with the closest-key hint
    assert get_task("toy").name == "toy"

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("task: toy\n")
    for name, loss in (("before", 2.0), ("after", 1.0)):
        (run / "eval" / f"{name}.json").write_text(json.dumps({"metrics": {"loss": loss}}))
    write_report(run)
    report = (run / "report.md").read_text()
    assert "untrained" in report and "of the toy before training" in report and "toy loss" in report


def test_fixture_smoke_commands_read_the_entry(toy_task, tmp_path, monkeypatch):
    from visiontune import recipe
    from visiontune.testing.fixtures import recipe_overrides

    recipes = tmp_path / "recipes" / "toy"
    recipes.mkdir(parents=True)
    (recipes / "toy-demo.yaml").write_text(
        "task: toy\nmodel: timm:vit_tiny_patch16_224\noutput_dir: runs/toy\ndata:\n  train: data/toy\n"
    )
    monkeypatch.setattr(recipe, "RECIPES_DIR", tmp_path / "recipes")
    overrides = recipe_overrides(Path("/fx"))["toy-demo"]
    assert "model=/fx/timm-vit" in overrides and "data.train=/fx/images" in overrides
