"""FSDP2 (`train.fsdp`: full_shard, shard_grad_op) for real, on two CPU ranks (gloo). accelerate sets FSDP up only on
GPUs; run/arguments.py `fsdp_on_cpu` makes its state on CPU ranks (else transformers trains plain DDP there). Per
sharding, one launch trains each task's built-in recipe on the tiny fixtures for two steps, then resumes each run from
its checkpoint for a third. Checked: every training step went through an FSDP2 (`fully_shard`) model whose parameters
are DTensor shards after the step, finite losses, the same weights on both ranks (gathered), one export of whole
tensors that its library loads, accelerate's FSDP checkpoint (optimiser included), and a resume that trains step 3
only (segment's gradual unfreeze: a frozen parameter without optimiser state). vlm_preference:
tests/vlm/test_preference_fsdp.py; the CLIP tasks: tests/clip/test_fsdp_ranks.py. Slow (twenty runs on two ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import two_ranks

TASKS = ("classify", "detect", "segment", "vlm_sft", "vlm_assemble")  # vlm_preference: tests/vlm/

fixtures_all = two_ranks.fixtures_all  # module-scoped: the tiny fixtures of every task


def _train(sharding: str, fx: Path, tmp: Path, tasks: tuple[str, ...] = TASKS) -> Path:
    runs = {task: argv for task, argv in two_ranks.task_runs(fx).items() if task in tasks}
    return two_ranks.train_and_resume("fsdp", sharding, runs, tmp, 1500)


@pytest.fixture(scope="module", params=["full_shard", "shard_grad_op"])
def trained(request, fixtures_all, tmp_path_factory) -> tuple[Path, Path]:
    return fixtures_all, _train(request.param, fixtures_all, tmp_path_factory.mktemp(request.param))


def _load_plain(task: str, export: Path, fx: Path) -> None:
    """Load the export as its library does (a saved shard in place of a whole tensor fails on its shape). detect and
    segment (torchvision nets) and vlm_assemble are rebuilt from their manifests, as `visiontune eval` does."""
    import timm
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if task == "classify":
        timm.create_model(f"local-dir:{export}")
    elif task == "detect":
        from visiontune.detect.model import build_detector

        build_detector(str(export), None)
    elif task == "segment":
        from visiontune.segment.model import build_segmenter

        build_segmenter(str(export), None)
    elif task in ("vlm_sft", "vlm_preference"):
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(fx / "vlm" / "qwen2_vl"), export)
    else:  # transformers for the language model; the rest rebuilt from the manifest (the assembled format)
        from visiontune.vlm.assembled import load_assembled

        AutoModelForCausalLM.from_pretrained(export / "language")
        load_assembled(export)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_task_trains_and_resumes_under_fsdp2(trained, task):
    fx, tmp = trained
    run = two_ranks.check_resumed(tmp, task, "fsdp")
    export = two_ranks.export(run)
    two_ranks.whole_tensors(export)  # plain tensors (an FSDP2 state_dict holds DTensor shards)
    _load_plain(task, export, fx)
