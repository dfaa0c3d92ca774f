"""Resume of vlm_preference on an assembled VLM (`init_from`), LoRA and full tuning: the interrupted run, resumed,
continues at the step it stopped (the next batches, the saved optimiser state and schedule) and against the START
model as its reference, not the checkpoint it resumed from (LoRA: the adapters and the projector copy load into the
PEFT model, the original projector stays the reference; full tuning: the reference log-probs are computed again from
the init_from model, the cache off so that nothing read back could hide a wrong model), and ends where the
uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.vlm.test_preference_assembled import _isolated, _raw, world  # noqa: F401 - shared fixtures


def _steps(run) -> dict[int, dict]:
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in logs if "loss" in r and "eval_loss" not in r}


class Recorder:
    """What each training step of each run (`runs[name]`, `name` set before the run) saw: its step counter, batch,
    reference log-probs and, at the first step of a process, the optimiser state and the policy's log-probs (eval
    mode: no dropout, no RNG drawn)."""

    def __init__(self, monkeypatch):
        from visiontune.vlm.preference import PreferenceTrainer
        from visiontune.vlm.preference_forward import answer_logps

        self.runs: dict[str, list[dict]] = {}
        self.name, self.trainer = "", None
        step, reference = PreferenceTrainer.training_step, PreferenceTrainer.reference_logps
        recorder = self

        def training_step(trainer, model, inputs, num_items_in_batch=None):
            steps = recorder.runs.setdefault(recorder.name, [])
            seen = {"step": trainer.state.global_step, "inputs": {k: v.clone() for k, v in inputs.items()}}
            if "ref_logps" in inputs:  # full tuning: precomputed before training
                seen["reference"] = inputs["ref_logps"].clone()
            if trainer is not recorder.trainer:  # a process's first step
                recorder.trainer = trainer
                seen["optimizer"] = trainer.optimizer.state_dict()["state"]
                seen["optimizer"] = {i: {k: v.clone() for k, v in s.items()} for i, s in seen["optimizer"].items()}
                model.eval()
                with torch.no_grad():
                    text = {k: v for k, v in inputs.items() if k not in ("labels", "ref_logps")}
                    unwrapped = trainer.accelerator.unwrap_model(model)
                    seen["policy"] = answer_logps(model, text, inputs["labels"], unwrapped).logps
                model.train()
            steps.append(seen)
            return step(trainer, model, inputs, num_items_in_batch)

        def reference_logps(trainer, model, inputs, labels):
            out = reference(trainer, model, inputs, labels)
            if model.training:  # LoRA: adapters off, per step
                recorder.runs[recorder.name][-1]["reference"] = out.clone()
            return out

        monkeypatch.setattr(PreferenceTrainer, "training_step", training_step)
        monkeypatch.setattr(PreferenceTrainer, "reference_logps", reference_logps)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_continues_the_step_optimizer_and_start_reference(
    world,  # noqa: F811
    write_recipe,
    cli,
    monkeypatch,
    tmp_path,
    method,
):
    from visiontune.vlm.assembled import load_assembled
    from visiontune.vlm.preference import PreferenceTrainer
    from visiontune.vlm.preference_forward import answer_logps

    sections = {
        "train": {"max_steps": 4, "eval_steps": 2, "save_total_limit": 5},
        "tune": {"method": method},
        "data": {"cache": method == "lora"},  # full: the resumed run computes its reference anew
    }
    recorder = Recorder(monkeypatch)
    recorder.name = "whole"
    assert cli("train", write_recipe(_raw(world, tmp_path / "whole", **sections), "whole.yaml"))[0] == 0
    recorder.name = "cut"
    recipe = write_recipe(_raw(world, tmp_path / "cut", **sections), "cut.yaml")
    recorded = PreferenceTrainer.training_step

    def stop_at_two(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return recorded(self, model, inputs, num_items_in_batch)

    with monkeypatch.context() as m:
        m.setattr(PreferenceTrainer, "training_step", stop_at_two)
        assert cli("train", recipe)[0] == 130
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err

    whole, cut = recorder.runs["whole"], recorder.runs["cut"]
    # the step counter and the data: the resumed process starts at step 2 with the batch the whole run had there
    assert [s["step"] for s in whole] == [0, 1, 2, 3] and [s["step"] for s in cut] == [0, 1, 2, 3]
    first = cut[2]
    for a, b in zip(whole, cut, strict=True):
        assert torch.equal(a["inputs"]["input_ids"], b["inputs"]["input_ids"])
    # the optimiser state is checkpoint-2's (AdamW moments after two steps), not a fresh one
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert cut[0]["optimizer"] == {} and first["optimizer"].keys() == saved["state"].keys()
    for i, state in saved["state"].items():
        assert int(state["step"]) == 2 and all(torch.equal(first["optimizer"][i][k], v) for k, v in state.items())
    # the reference of every step, the resumed ones included, is the init_from model's, not the checkpoint's
    start, _ = load_assembled(world["run"] / "model")
    start.eval()
    for s in cut:
        batch = {k: v for k, v in s["inputs"].items() if k not in ("labels", "ref_logps")}
        with torch.no_grad():
            expected = answer_logps(start, batch, s["inputs"]["labels"]).logps
        torch.testing.assert_close(s["reference"], expected, rtol=1e-5, atol=1e-4)
    assert (first["policy"] - first["reference"]).abs().max() > 1e-2  # the checkpoint's weights differ from it
    # the resumed steps log what the whole run logged (the same batches, weights, optimiser and schedule)
    a, b = _steps(tmp_path / "whole"), _steps(tmp_path / "cut")
    for step in (3, 4):
        assert b[step]["learning_rate"] == a[step]["learning_rate"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-5)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    x, y = (load_file(str(tmp_path / run / "checkpoints" / "checkpoint-4" / name)) for run in ("whole", "cut"))
    assert x and x.keys() == y.keys() and any("projector" in k for k in x)
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=1e-5, atol=1e-6)
    # the resumed run's export: vlm_assemble's format (LoRA merged), the kept (best) checkpoint's projector in place
    model, _ = load_assembled(tmp_path / "cut" / "model")
    key = ("base_model.model." if method == "lora" else "") + "projector.net.0.bias"
    saved = [load_file(str(p))[key] for p in (tmp_path / "cut" / "checkpoints").glob(f"checkpoint-*/{name}")]
    assert len(saved) == 2 and any(torch.equal(model.projector.net[0].bias, s) for s in saved)
    assert not torch.equal(model.projector.net[0].bias, start.projector.net[0].bias)
    trained = json.loads((tmp_path / "cut" / "summary.json").read_text())["trainable_parameters"]
    assert trained["projector"] > 0 and trained["language"] > 0 and trained["vision"] == 0
