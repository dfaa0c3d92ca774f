"""`visiontune plan` on a built-in recipe of every registered task, run on the tiny fixtures the way `visiontune
fixtures` smoke-runs them: the table prints, plan.json holds every section, nothing is trained into a run folder.
The VLM tasks are in test_plan_tasks_vlm.py (one file for all took over a minute here)."""

import json
from pathlib import Path

import pytest

from visiontune.registry import TASKS


def write_fixtures(root: Path, vlm: bool) -> Path:
    """What the smoke overrides of the chosen recipes point at: the image models and data sets, and for the VLM
    tasks the tiny VLMs and causal LMs (the rest of `write_everything` is left out: it is time)."""
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import write_all, write_data
    from visiontune.testing.vlm_fixtures import write_all_lms, write_all_vlms

    with fixture_seed():
        written = write_all(root)
        write_data(root, written["images"])
        if vlm:
            write_all_vlms(root / "vlm")
            write_all_lms(root / "lm")
    return root


@pytest.fixture(scope="module")
def image_fixtures(tmp_path_factory) -> Path:
    return write_fixtures(tmp_path_factory.mktemp("fixtures"), vlm=False)


def recipe_for(task: str, root: Path) -> tuple[str, list[str]]:
    """The task's first built-in recipe with its smoke overrides; a recipe that starts from another recipe's smoke
    run starts from the task's model fixture instead (a plan trains nothing it could start from)."""
    from visiontune.recipe import RECIPES_DIR, read_yaml
    from visiontune.testing.fixtures import SMOKE_RUNS, _model_fixture, recipe_overrides

    tasks = {path.stem: read_yaml(path)["task"] for path in RECIPES_DIR.rglob("*.yaml")}
    overrides = recipe_overrides(root)
    names = sorted((n for n in overrides if tasks[n] == task), key=lambda n: any(SMOKE_RUNS in o for o in overrides[n]))
    name = names[0]
    fixed = []
    for item in overrides[name]:
        key, _, value = item.partition("=")
        if SMOKE_RUNS in value and key != "output_dir":
            value = _model_fixture(TASKS[task].smoke.model, key, "", root)
        fixed.append(f"{key}={value}")
    return name, fixed


VLM_TASKS = [t for t in TASKS if TASKS[t].task.startswith("visiontune.vlm.")]


@pytest.mark.parametrize("task", [t for t in TASKS if t not in VLM_TASKS])
def test_plan_prints_its_table_for_a_recipe_of_every_image_task(task, image_fixtures, cli, tmp_path, monkeypatch):
    check_plan(task, image_fixtures, cli, tmp_path, monkeypatch)


def check_plan(task: str, everything: Path, cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the smoke overrides put output_dir under ./runs/smoke
    name, overrides = recipe_for(task, everything)
    code, out, err = cli("plan", name, *overrides, "--out", tmp_path / "plan.json")
    assert code == 0, err
    assert f"{task} on cpu" in out and "memory (estimate)" in out and "expected time" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["task"] == task and any(n > 0 for k, n in plan["samples"].items() if k != "skipped")
    assert plan["parameters"]["trainable"] > 0 and plan["memory"]["measured_peak"] > 0
    assert plan["time"]["seconds_per_batch"] > 0 and plan["time"]["optimizer_steps"] == 2  # train.max_steps=2
    if task in ("vlm_sft", "vlm_assemble"):
        assert plan["tokens"]["records"] == plan["samples"]["train_samples"]
    assert not (tmp_path / "runs").exists()
