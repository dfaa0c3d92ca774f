import subprocess
import sys

import pytest

from tests.conftest import REPO
from visiontune.core.errors import RecipeError
from visiontune.recipe import load_recipe

RECIPES = sorted((REPO / "src/visiontune/recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert RECIPES, "no built-in recipes found"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_builtin_recipe_validates(recipe, cli):
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    assert "valid" in out
    header = recipe.read_text().splitlines()[:3]
    assert any("visiontune train" in line for line in header), "recipe header must give the command that runs it"


def test_overrides_apply_with_yaml_types(tiny_recipe, write_recipe):
    path = write_recipe(tiny_recipe())
    cfg = load_recipe(path, ["train.lr=1e-4", "train.epochs=5", "data.on_bad_sample=skip", "train.max_steps=7"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 5 and cfg.train.max_steps == 7
    assert cfg.data.on_bad_sample == "skip"


def test_unknown_key_names_closest(tiny_recipe, write_recipe):
    path = write_recipe(tiny_recipe())
    with pytest.raises(RecipeError, match=r"unknown key `train.lrr`; did you mean `train.lr`"):
        load_recipe(path, ["train.lrr=3"])


def test_wrong_type_names_key(tiny_recipe, write_recipe):
    path = write_recipe(tiny_recipe())
    with pytest.raises(RecipeError, match=r"`train.batch_size` = 'many' is invalid"):
        load_recipe(path, ["train.batch_size=many"])


def test_bad_override_syntax_and_unknown_task(tiny_recipe, write_recipe):
    path = write_recipe(tiny_recipe())
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(path, ["train.lr"])
    with pytest.raises(RecipeError, match="not a known task"):
        load_recipe(path, ["task=segment_everything"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_validate_cli_reports_one_sentence(tiny_recipe, write_recipe, cli):
    path = write_recipe(tiny_recipe())
    code, _, err = cli("validate", path, "data.on_bad_sample=ignore")
    assert code == 2
    assert "data.on_bad_sample" in err and "Traceback" not in err


def test_help_and_validate_do_not_import_torch(tiny_recipe, write_recipe):
    path = write_recipe(tiny_recipe())
    code = (
        f"import sys; sys.argv=['visiontune','validate',{str(path)!r}]\n"
        "from visiontune.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "visiontune", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "validate" in out.stdout


@pytest.mark.parametrize(("key", "value"), [("model", "./no-such-model"), ("model", "builtin:digits")])
def test_a_model_source_that_leads_nowhere_is_refused_before_any_run_folder(
    key, value, tiny_recipe, write_recipe, cli, tmp_path
):
    recipe = write_recipe(tiny_recipe(output_dir=str(tmp_path / "run")))
    code, _, err = cli("validate", recipe, f"{key}={value}")
    assert code == 2 and err.startswith(f"error: {key}: {value} ") and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("train", recipe, f"{key}={value}")
    assert code == 2 and f"{key}: {value}" in err
    assert not (tmp_path / "run").exists()
