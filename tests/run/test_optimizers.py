"""train.optimizer's bitsandbytes options: 8-bit AdamW builds and steps (uint8 moments) through the runner on CPU;
paged AdamW is refused when the recipe is read on a machine that trains on CPU, and built paged where a GPU trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visiontune.core.errors import RecipeError
from visiontune.recipe import parse_config
from visiontune.run.arguments import training_arguments
from visiontune.run.optim import build_optimizer

bnb = pytest.importorskip("bitsandbytes")


def _train(**train) -> object:
    recipe = {"task": "vlm_sft", "model": "unused", "output_dir": "unused", "data": {"train": "x"}}
    return parse_config({**recipe, "train": train}).train


def test_adamw_8bit_trains_through_the_runner(tiny_recipe, write_recipe, cli, monkeypatch):
    """A spy on the optimiser's step: the runner's Trainer steps bitsandbytes' AdamW, its moments stored in uint8."""
    seen: list[torch.optim.Optimizer] = []
    real_step = bnb.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(bnb.optim.AdamW, "step", spy)
    code, _, err = cli("train", write_recipe(tiny_recipe(train={"max_steps": 2, "optimizer": "adamw_8bit"})))
    assert code == 0, err
    assert len(seen) == 2 and seen[0] is seen[1]
    opt = seen[0]
    assert type(opt) is bnb.optim.AdamW and opt.args.optim_bits == 8 and not opt.is_paged
    big = [s for p, s in opt.state.items() if p.numel() >= 4096]  # bitsandbytes keeps smaller ones' in fp32
    assert big and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in big)


def test_parameter_groups_survive():
    """No weight decay on biases and norms, as with torch's AdamW (the groups are run/optim.py's)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="adamw_8bit")
    decay = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert decay == {0.1: 64 * 64, 0.0: 64 + 64 + 64}


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw"])
def test_paged_is_refused_on_cpu(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match=f"train.optimizer: {name} pages optimiser states out of GPU memory"):
        _train(optimizer=name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine ...
    with pytest.raises(RecipeError, match="trains on CPU"):
        _train(optimizer=name, cpu=True)  # ... told to train on CPU


@pytest.mark.parametrize(
    ("name", "bits", "trainer_optim"),
    [("paged_adamw_8bit", 8, "paged_adamw_8bit"), ("paged_adamw", 32, "paged_adamw_32bit")],
)
def test_paged_is_built_paged_where_a_gpu_trains(monkeypatch, tmp_path, name, bits, trainer_optim):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train = _train(optimizer=name)
    args = training_arguments(train.model_copy(update={"cpu": True}), tmp_path, 0, 0, [])  # arguments on this CPU
    assert args.optim == trainer_optim  # the Trainer's own name for the same optimiser
    opt = build_optimizer(nn.Linear(8, 8), lr=1e-3, weight_decay=0.0, optimizer=train.optimizer)
    assert type(opt) is bnb.optim.AdamW and opt.is_paged and opt.args.optim_bits == bits
