"""CpuDropout behaves as nn.Dropout (keep rate, scaling, eval identity, gradient) and the runner puts it in PEFT's
LoRA layers when training on CPU."""

from __future__ import annotations

import torch
from torch import nn

from visiontune.run.cpu_dropout import CpuDropout, cheapen_lora_dropout


def test_keeps_one_minus_p_scales_what_it_keeps_and_is_the_identity_in_eval():
    torch.manual_seed(0)  # the masks follow torch's seed: the same draws on every run
    drop = CpuDropout(0.25)
    x = torch.ones(400, 500)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 200,000 draws: the standard error is 0.001
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert torch.equal(drop.eval()(x), x)


def test_torch_seed_fixes_the_mask_and_the_gradient_is_the_mask():
    drop = CpuDropout(0.5)
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, drop(x))
    a.sum().backward()
    assert torch.equal(x.grad, (a != 0).float() * 2.0)


def test_only_lora_dropouts_are_swapped():
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    model = get_peft_model(base, LoraConfig(r=2, lora_dropout=0.1, target_modules=["0", "2"]))
    assert cheapen_lora_dropout(model) == 2
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert sorted(type(m).__name__ for m in drops) == ["CpuDropout", "CpuDropout", "Dropout"]  # the model's own stays
    model.train()
    assert model(torch.randn(4, 8)).shape == (4, 2)


def test_the_runner_swaps_them_when_training_on_cpu(tiny_recipe, write_recipe, tmp_path):
    from visiontune.recipe import get_task, load_recipe
    from visiontune.run.runner import make_trainer

    cfg = load_recipe(write_recipe(tiny_recipe(tune={"method": "lora", "lora": {"dropout": 0.1}})), [])
    task = get_task(cfg.task)
    fit = task.build(cfg, task.prepare(cfg), tmp_path / "run")
    trainer = make_trainer(cfg, fit, tmp_path / "run")
    lora = [
        d
        for m in trainer.model.modules()
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
        for d in m.lora_dropout.values()
    ]
    assert lora and all(type(d) is CpuDropout and d.p == 0.1 for d in lora)
