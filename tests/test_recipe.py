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


# ---- values that should not pass: `validate` catches each one in one sentence


@pytest.mark.parametrize(
    "text, message",
    [
        ("task: classify\ndata:\n  train: a\ndata:\n  val: b\n", r":4: `data` appears twice \(first on line 2\)"),
        ("task: classify\nmodel: [a\n", r":3 is not valid YAML"),
        ("", "is empty; a recipe starts with `task:`"),
        ("model: m\noutput_dir: o\n", "`task:` is missing"),
    ],
)
def test_recipe_files_that_are_not_recipes(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_a_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=true", "`train.batch_size` = True is invalid: .*whole number above 0 or auto"),
        ("train.epochs=.inf", "`train.epochs` = inf is invalid: .*finite"),
        ("train.lr=.nan", "`train.lr` = nan is invalid: .*finite"),
        ("train.metric=acc", "train.metric `acc` is not a validation metric of classify.*accuracy, macro_f1"),
    ],
)
def test_values_that_would_fail_late_are_refused(tiny_recipe, write_recipe, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tiny_recipe()), [override])


def test_a_true_false_key_still_takes_true(tiny_recipe, write_recipe):
    assert load_recipe(write_recipe(tiny_recipe()), ["train.cpu=true"]).train.cpu is True


def test_vlm_metric_follows_the_generation_metrics(write_recipe):
    raw = {"task": "vlm_sft", "model": "m", "output_dir": "o", "data": {"train": "c.json"}}
    ok = load_recipe(write_recipe(raw), ["train.metric=json_field_f1", "eval.metrics=[json]"])
    assert ok.train.metric == "json_field_f1"
    with pytest.raises(RecipeError, match="use one of loss$|use one of loss\\."):
        load_recipe(write_recipe(raw), ["train.metric=exact_match", "eval.samples_during_training=0"])


# ---- layers: a command-line key that makes a recipe key inert wins; a contradiction inside one layer is refused


def test_command_line_key_wins_over_the_file_key_it_makes_inert(write_recipe, capsys, tmp_path):
    raw = {"task": "classify", "model": "timm:resnet18", "output_dir": "o", "data": {"train": "a", "val_split": 0.3}}
    cfg = load_recipe(write_recipe(raw), [f"data.val={tmp_path}"])
    assert cfg.data.val == str(tmp_path) and "val_split" not in cfg.data.model_fields_set
    assert "`data.val_split` no longer applies" in capsys.readouterr().err


def test_builtin_recipe_takes_command_line_keys_that_override_it(cli, tmp_path):
    code, _, err = cli("validate", "mnist-efficientnet-lite0", f"data.train={tmp_path}", f"data.val={tmp_path}")
    assert code == 0, err
    assert "data.val_split" in err and "no longer applies" in err
    code, _, err = cli("validate", "l-lora", "skip_training=true")
    assert code == 0, err
    assert "train.lr" in err and "tune.method" in err


def test_contradiction_inside_one_layer_is_refused(write_recipe):
    raw = {"task": "classify", "model": "timm:resnet18", "output_dir": "o", "data": {"train": "a"}}
    with pytest.raises(RecipeError, match="train.momentum acts only with train.optimizer: sgd"):
        load_recipe(write_recipe(raw), ["train.momentum=0.5"])  # inside the command line
    raw["data"] |= {"val": "v", "val_split": 0.3}
    with pytest.raises(RecipeError, match="data.val_split acts only"):
        load_recipe(write_recipe(raw))  # inside the file
