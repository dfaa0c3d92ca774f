"""The package installs like one: the wheel carries every built-in recipe (found by name from any directory) and
every built-in DeepSpeed config (`train.deepspeed: zero2`)."""

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO
from visiontune.recipe import RECIPES_DIR, find_recipe
from visiontune.run.config import DEEPSPEED_DIR


def test_wheel_ships_every_builtin_recipe_and_deepspeed_config(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deprecat" not in proc.stderr.lower()
    (wheel,) = tmp_path.glob("visiontune-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in ((RECIPES_DIR, "*.yaml"), (DEEPSPEED_DIR, "*.json")):
        expected = {f"visiontune/{p.relative_to(REPO / 'src' / 'visiontune')}" for p in folder.rglob(pattern)}
        assert expected and expected <= shipped, folder


def test_builtin_recipes_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("mnist-efficientnet-lite0") == RECIPES_DIR / "classify" / "mnist-efficientnet-lite0.yaml"
