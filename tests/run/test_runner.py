"""The runner's promises that hold for every task: no run folder before the data passed its checks, one line when
samples were skipped or a run resumes, resume refuses a changed recipe, `train.resume: true` starts a first run."""

import json
import shutil
from pathlib import Path


def test_a_run_stopped_by_a_data_error_can_be_rerun_corrected(tiny_recipe, write_recipe, cli, fixtures_dir, tmp_path):
    recipe = tiny_recipe(data={"train": str(tmp_path / "missing")})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 2 and "missing" in err
    assert not Path(recipe["output_dir"]).exists()  # nothing to protect, nothing blocks the retry
    recipe["data"]["train"] = str(fixtures_dir / "images")
    recipe["train"] = {**recipe["train"], "max_steps": 1}
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err


def test_skipped_samples_and_resume_are_said_once(tiny_recipe, write_recipe, cli, fixtures_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(fixtures_dir / "images", images)
    (images / "class_0" / "broken.png").write_bytes(b"not a png")
    recipe = tiny_recipe(data={"train": str(images), "on_bad_sample": "skip"}, train={"max_steps": 2, "eval_steps": 1})
    path = write_recipe(recipe)
    code, _, err = cli("train", path)
    assert code == 0, err
    assert err.count("Skipped 1 unreadable sample(s)") == 1 and "data_report.json" in err
    assert "loss nan" not in err
    report = json.loads((Path(recipe["output_dir"]) / "data_report.json").read_text())
    assert [s["ref"].endswith("broken.png") for s in report["skipped"]] == [True]
    code, _, err = cli("train", path, "--resume", "train.max_steps=3")
    assert code == 0, err
    assert "Resuming from" in err and "(step 2 of 2)" in err


def test_resume_refuses_a_changed_model_or_data(tiny_recipe, write_recipe, cli, fixtures_dir):
    recipe = tiny_recipe(train={"max_steps": 1})
    path = write_recipe(recipe)
    assert cli("train", path)[0] == 0
    code, _, err = cli("train", path, "--resume", "train.lr=0.5", "data.val_split=0.5")
    assert code == 2 and "data.val_split" in err and "train.lr" in err and "new output_dir" in err


def test_resume_key_in_the_recipe_starts_the_first_run(tiny_recipe, write_recipe, cli):
    recipe = tiny_recipe(train={"max_steps": 1, "resume": True})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    assert (Path(recipe["output_dir"]) / "model").is_dir()


def test_new_weights_start_from_the_recipe_seed_whatever_ran_before(tiny_recipe, write_recipe, cli, monkeypatch):
    """What `build` initialises (LoRA's A matrices, a new head) must not depend on what the process drew earlier:
    a resumed run, or a second run in one process, would otherwise start from other weights."""
    import torch

    from visiontune.classify.task import ClassifyTask

    drawn = []
    build = ClassifyTask.build

    def spy(self, cfg, data, run_dir):
        drawn.append(torch.rand(3).tolist())
        return build(self, cfg, data, run_dir)

    monkeypatch.setattr(ClassifyTask, "build", spy)
    for earlier, folder in ((1, "a"), (2, "b")):
        torch.manual_seed(earlier)  # another draw history before each run
        recipe = tiny_recipe(train={"max_steps": 1})
        recipe["output_dir"] += folder
        code, _, err = cli("train", write_recipe(recipe))
        assert code == 0, err
    assert drawn[0] == drawn[1]
