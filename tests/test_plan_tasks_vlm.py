"""`visiontune plan` on a built-in recipe of every VLM task (the image tasks: test_plan_tasks.py)."""

from pathlib import Path

import pytest

from tests.test_plan_tasks import VLM_TASKS, check_plan, write_fixtures


@pytest.fixture(scope="module")
def vlm_fixtures(tmp_path_factory) -> Path:
    return write_fixtures(tmp_path_factory.mktemp("fixtures"), vlm=True)


@pytest.mark.parametrize("task", VLM_TASKS)
def test_plan_prints_its_table_for_a_recipe_of_every_vlm_task(task, vlm_fixtures, cli, tmp_path, monkeypatch):
    check_plan(task, vlm_fixtures, cli, tmp_path, monkeypatch)
