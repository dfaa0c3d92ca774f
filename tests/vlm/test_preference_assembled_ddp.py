"""vlm_preference on an assembled VLM (`init_from`; LoRA: one PEFT model, the projector trained as modules_to_save;
full tuning) on two DDP ranks (CPU, gloo, `visiontune train --nproc 2`): finite losses, the ranks end with the same
weights, rank 0 alone exports, and on both ranks the reference (LoRA: adapters off, i.e. LoRA off and the original
projector; full: the log-probs each rank computed before training) is the init_from model at every step and after
training.

What the ranks compute is seen through a `sitecustomize` module the test puts on the ranks' PYTHONPATH: in a rank
process (RANK set) it wraps PreferenceTrainer's reference, loss and train, and the assembled export, and writes what
they saw to RUN/probe/rank{R}.jsonl, with the log-probs of a frozen init_from model on the same batches."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import train_two_ranks
from tests.vlm.test_preference_assembled import _isolated, _raw, world  # noqa: F401 - shared fixtures

PROBE = """
import os

if "RANK" in os.environ and os.environ.get("PREFERENCE_PROBE"):
    import json
    from pathlib import Path

    import torch

    from visiontune.vlm import preference_assembled
    from visiontune.vlm.assembled import load_assembled
    from visiontune.vlm.preference import PreferenceTrainer
    from visiontune.vlm.preference_forward import answer_logps

    start = load_assembled(os.environ["PREFERENCE_PROBE"])[0].eval()
    reference, loss, train, save = (
        PreferenceTrainer.reference_logps, PreferenceTrainer.compute_loss, PreferenceTrainer.train,
        preference_assembled.save_assembled,
    )

    def write(trainer, **record):
        out = Path(trainer.args.output_dir).parent / "probe"  # args.output_dir: RUN/checkpoints
        out.mkdir(exist_ok=True)
        with open(out / f"rank{os.environ['RANK']}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.state.global_step, **record}) + "\\n")

    def reference_logps(self, model, inputs, labels):
        out = reference(self, model, inputs, labels)
        with torch.no_grad():
            expected = answer_logps(start, inputs, labels).logps
        write(self, what="reference", training=model.training, ref=out.tolist(), start=expected.tolist())
        return out

    def compute_loss(self, model, inputs, *args, **kwargs):
        if "ref_logps" in inputs:  # full tuning: computed before training
            text = {k: v for k, v in inputs.items() if k not in ("labels", "ref_logps")}
            with torch.no_grad():
                expected = answer_logps(start, text, inputs["labels"]).logps
            ref = inputs["ref_logps"].tolist()
            write(self, what="reference", training=model.training, ref=ref, start=expected.tolist())
        out = loss(self, model, inputs, *args, **kwargs)
        value = out[0] if isinstance(out, tuple) else out
        write(self, what="loss", training=model.training, loss=float(value))
        return out

    def after_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        batch = self.data_collator([self.train_dataset[0], self.train_dataset[1]])  # the same pairs on each rank
        labels = batch.pop("labels")
        self.model.eval()
        with torch.no_grad():
            policy = answer_logps(self.model, batch, labels, self.accelerator.unwrap_model(self.model)).logps
            expected = answer_logps(start, batch, labels).logps
        if self.mode == "adapters_off":
            ref = self.reference_logps(self.model, batch, labels)
        else:  # the precomputed [N, 2] (chosen, rejected) of pairs 0 and 1, as the batch's [chosen; rejected] rows
            ref = self.train_dataset.reference[:2].T.reshape(-1)
        write(self, what="final", ref=ref.tolist(), policy=policy.tolist(), start=expected.tolist())
        return result

    def save_assembled(model, processor, run_dir):
        with open(Path(run_dir) / "probe" / f"export{os.environ['RANK']}", "a") as f:
            f.write("1")
        return save(model, processor, run_dir)

    PreferenceTrainer.reference_logps = reference_logps
    PreferenceTrainer.compute_loss = compute_loss
    PreferenceTrainer.train = after_train
    preference_assembled.save_assembled = save_assembled
"""


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol + 1e-5 * abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow  # two rank processes that each import torch, transformers and PEFT: ~35 CPU-seconds
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_ranks_train_in_step_against_the_start_reference_and_export_once(
    world,  # noqa: F811
    method,
    write_recipe,
    tmp_path,
    monkeypatch,
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", f"{site}:{__import__('os').environ.get('PYTHONPATH', '')}".rstrip(":"))
    monkeypatch.setenv("PREFERENCE_PROBE", str(world["run"] / "model"))
    run = tmp_path / "ddp"
    train = {"max_steps": 3, "batch_size": 2, "eval_steps": 3}
    recipe = _raw(world, run, train=train, eval={"max_samples": 2}, tune={"method": method})
    ranks = train_two_ranks(write_recipe(recipe))

    assert [r["world_size"] for r in ranks] == [2, 2] and [r["samples_seen"] for r in ranks] == [6, 6]
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "ranks ended with different weights"
    seen = [[json.loads(line) for line in (run / "probe" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    for records in seen:
        losses = [r["loss"] for r in records if r["what"] == "loss" and r["training"]]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1: the policy is its reference
        refs = [r for r in records if r["what"] == "reference"]
        assert sum(r["training"] for r in refs) == 3 and any(not r["training"] for r in refs)  # steps, validation
        assert all(_close(r["ref"], r["start"]) for r in refs), "the reference moved away from the init_from model"
    final = [next(r for r in records if r["what"] == "final") for records in seen]
    assert all(_close(f["ref"], f["start"]) for f in final)
    assert _close(final[0]["ref"], final[1]["ref"], 1e-6) and _close(final[0]["policy"], final[1]["policy"], 1e-6)
    assert not _close(final[0]["policy"], final[0]["start"], 1e-2)  # trained: the policy left its reference
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logged if "loss" in r)
    assert sorted(p.name for p in (run / "probe").glob("export*")) == ["export0"]  # rank 0 alone exports
    assert (run / "probe" / "export0").read_text() == "1" and (run / "model" / "visiontune.json").is_file()
    assert (run / "report.md").is_file()
