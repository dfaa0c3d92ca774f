"""`train.batch_size: auto` and `train.global_batch_size`: halving on (simulated) out-of-memory, the global batch kept
by gradient accumulation, the choice recorded in config.yaml and summary.json and kept on resume, the CPU memory
limit, and the refusals."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from visiontune.plan import batch as batch_module


@pytest.fixture
def oom_above(monkeypatch):
    """Replace the probe with one that runs out of memory above `limit` samples; returns the batches it was asked."""
    tried: list[int] = []

    def install(limit: int) -> list[int]:
        def probe_fits(cfg, fit):
            def fits(batch: int) -> None:
                tried.append(batch)
                if batch > limit:
                    raise torch.OutOfMemoryError(f"simulated: {batch} > {limit}")

            return fits

        monkeypatch.setattr(batch_module, "probe_fits", probe_fits)
        return tried

    return install


def _run(cli, write_recipe, recipe: dict, *overrides: str) -> tuple[dict, dict]:
    code, _, err = cli("train", write_recipe(recipe), *overrides)
    assert code == 0, err
    run = Path(recipe["output_dir"])
    return yaml.safe_load((run / "config.yaml").read_text())["train"], json.loads((run / "summary.json").read_text())


def test_auto_halves_on_out_of_memory_and_records_the_batch(tiny_recipe, write_recipe, cli, oom_above):
    tried = oom_above(5)
    train, summary = _run(cli, write_recipe, tiny_recipe(train={"batch_size": "auto", "max_steps": 1}))
    assert tried == [16, 8, 4]  # 27 training images: from 16 down
    assert (train["batch_size"], train["grad_accum"]) == (4, 1)
    assert (summary["batch_size"], summary["grad_accum"]) == (4, 1)


def test_auto_keeps_the_global_batch_with_accumulation(tiny_recipe, write_recipe, cli, oom_above):
    tried = oom_above(5)
    recipe = tiny_recipe(train={"batch_size": "auto", "global_batch_size": 12, "max_steps": 1})
    train, summary = _run(cli, write_recipe, recipe)
    assert tried == [8, 4]  # never above the global batch; 4 fits, and divides 12
    assert (train["batch_size"], train["grad_accum"], train["global_batch_size"]) == (4, 3, None)
    assert summary["global_batch_size"] == 12


def test_a_given_batch_and_a_global_batch_set_the_accumulation(tiny_recipe, write_recipe, cli):
    train, _ = _run(cli, write_recipe, tiny_recipe(train={"batch_size": 4, "global_batch_size": 16, "max_steps": 1}))
    assert (train["batch_size"], train["grad_accum"]) == (4, 4)


def test_a_resumed_auto_run_keeps_the_batch_it_started_with(tiny_recipe, write_recipe, cli, oom_above):
    tried = oom_above(5)
    recipe = tiny_recipe(train={"batch_size": "auto", "global_batch_size": 8, "max_steps": 1})
    _run(cli, write_recipe, recipe)
    tried.clear()
    oom_above(100)  # more memory now: a fresh probe would choose 8
    train, summary = _run(cli, write_recipe, recipe, "--resume", "train.max_steps=2")
    assert tried == [] and (train["batch_size"], train["grad_accum"]) == (4, 2) and summary["global_step"] == 2


def test_the_run_config_is_a_recipe_that_trains_the_same_batch(tiny_recipe, write_recipe, cli, oom_above):
    oom_above(5)
    recipe = tiny_recipe(train={"batch_size": "auto", "global_batch_size": 8, "max_steps": 1})
    _run(cli, write_recipe, recipe)
    code, out, err = cli("validate", Path(recipe["output_dir"]) / "config.yaml")
    assert code == 0, err


def test_cpu_limit_follows_the_available_memory(tiny_recipe, write_recipe, tmp_path):
    """On CPU a try is the memory estimate against the available memory: plenty fits the largest batch, too
    little fits none (one sentence), and the linear extension agrees with a direct estimate at that batch."""
    from visiontune.core.errors import RecipeError
    from visiontune.plan.batch import cpu_fits, largest_fitting
    from visiontune.plan.make import plan_config
    from visiontune.plan.memory import estimate_memory
    from visiontune.plan.probe import StepProbe
    from visiontune.recipe import get_task, load_recipe
    from visiontune.run.runner import make_trainer

    cfg = plan_config(load_recipe(write_recipe(tiny_recipe(train={"batch_size": 16})), []))
    task = get_task(cfg.task)
    fit = task.build(cfg, task.prepare(cfg), tmp_path / "run")
    probe = StepProbe(make_trainer(cfg, fit, tmp_path / "run"))
    before = {k: v.clone() for k, v in probe.model.state_dict().items()}
    assert largest_fitting(cpu_fits(probe, cfg, available=2**40), 16) == 16
    with pytest.raises(RecipeError, match="not even one sample"):
        largest_fitting(cpu_fits(probe, cfg, available=1), 16)
    for key, value in probe.model.state_dict().items():  # probing leaves the model as it was
        assert torch.equal(value, before[key]), key
    direct = estimate_memory(probe.model, probe.batch_of(16), lambda: probe.loss(probe.batch_of(16)), "adamw", 0.0)
    need = direct.peak - direct.weights
    fits_8 = cpu_fits(probe, cfg, available=int(need / batch_module.MEMORY_SHARE * 0.6))
    with pytest.raises(torch.OutOfMemoryError):
        fits_8(16)  # 60 % of what batch 16 needs: refused ...
    fits_8(4)  # ... and a quarter of the batch fits


def test_refusals(tiny_recipe, write_recipe, cli, fixtures_dir):
    code, _, err = cli("validate", write_recipe(tiny_recipe(train={"grad_accum": 2, "global_batch_size": 16})))
    assert code == 2 and "train.grad_accum and train.global_batch_size" in err
    recipe = tiny_recipe(train={"batch_size": 4, "global_batch_size": 10, "max_steps": 1})
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 2 and "not a multiple of train.batch_size 4" in err
    assert not Path(recipe["output_dir"], "config.yaml").exists()
    contrastive = {
        "task": "clip_contrastive",
        "model": str(fixtures_dir / "clip"),
        "data": {"train": "x.csv"},
        "train": {"batch_size": "auto"},
    }
    code, _, err = cli("validate", write_recipe(contrastive))
    assert code == 2 and "train.batch_size" in err
