"""Records with and without images in one run (vlm/mixed_batches.py): a batch without images runs the vision path on
a stand-in image, adding 0 x its features. Fast: the loss is exactly the one without the stand-in, and the gradients
come in the same order as on an image batch (what keeps DeepSpeed's gradient buckets in step across ranks), for a
transformers VLM and an assembled one. Slow: two gloo ranks, rank 0's batches with an image and rank 1's without,
under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (where, before the stand-in, ZeRO-3 peers hung and ZeRO-2 stopped on gloo's
collective mismatch)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

COLOURS = [("red", (220, 30, 30)), ("green", (30, 200, 30))]


def _records(*images: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(images=["x.png"] * n, ref=f"data.json record {i}") for i, n in enumerate(images)]


def test_mixed_images_means_both_kinds():
    from visiontune.vlm.mixed_batches import mixed_images

    assert mixed_images(_records(1, 0)) and not mixed_images(_records(1, 2)) and not mixed_images(_records(0, 0))


def test_stand_in_only_where_ranks_train_on_mixed_records(monkeypatch):
    # one process keeps its text-only steps as they were (no vision gradients at all, so AdamW leaves those weights)
    from visiontune.vlm.mixed_batches import keep_ranks_in_step

    assert keep_ranks_in_step(None, None, 0, _records(1, 0)) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert keep_ranks_in_step(None, None, 0, _records(1, 1)) is None


def _write_mixed(folder: Path, n: int = 8) -> list[dict]:
    """`n` colour conversations, the even ones about an image, the odd ones text only."""
    records = []
    for i, (name, rgb) in enumerate(COLOURS * (n // 2)):
        question = "Say a colour."
        if i % 2 == 0:
            Image.new("RGB", (40, 30), rgb).save(folder / f"{i}.png")
            question = "<image>What colour is this?"
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": name}]
        records.append({"messages": turns, **({"images": [f"{i}.png"]} if i % 2 == 0 else {})})
    (folder / "data.json").write_text(json.dumps(records))
    return records


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    _write_mixed(folder, 2)
    return folder / "data.json"


def _model(kind: str, folder: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.conftest import fixture_seed

    with fixture_seed():
        if kind == "assembled":
            from visiontune.testing.fixtures import tiny_clip
            from visiontune.testing.vlm_fixtures import tiny_causal_lm
            from visiontune.vlm.assembled import build_assembled

            clip, lm = tiny_clip(folder / "clip"), tiny_causal_lm("qwen2", folder / "qwen2")
            return build_assembled(str(clip), str(lm), {"kind": "mlp2x_gelu", "options": {}})
        from visiontune.testing.vlm_fixtures import tiny_vlm

        path = tiny_vlm(kind, folder / kind)
        return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _batches(processor, data: Path) -> tuple[dict, dict]:
    from visiontune.vlm.collate import VlmCollator
    from visiontune.vlm.conversations import read_conversations
    from visiontune.vlm.tokenize import tokenize

    collate = VlmCollator(processor, 512 * 512)
    batches = []
    for conv in read_conversations(str(data)):
        t = tokenize(processor, conv, 512, 512 * 512, "assistant")
        batches.append(collate([{"input_ids": t.input_ids, "labels": t.labels, "extra": t.extra, "conv": conv}]))
    return batches[0], batches[1]


def _step(model, batch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Loss, logits and the names of the parameters in the order their gradients were ready."""
    order: list[str] = []
    hooks = [
        p.register_post_accumulate_grad_hook(lambda _, n=name: order.append(n))
        for name, p in model.named_parameters()
        if p.requires_grad
    ]
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    for hook in hooks:
        hook.remove()
    return out.loss.detach(), out.logits.detach(), order


@pytest.mark.parametrize("kind", ["qwen2_vl", "assembled"])
def test_stand_in_leaves_the_loss_and_gives_the_image_gradient_order(kind, mixed, tmp_path):
    from visiontune.vlm.mixed_batches import install_stand_in

    model, processor = _model(kind, tmp_path)
    for p in model.parameters():  # every part trains: the vision tower's gradients must come in step too
        p.requires_grad_(True)
    image, text = _batches(processor, mixed)
    assert "pixel_values" in image and "pixel_values" not in text
    loss, logits, bare = _step(model, text)
    _, _, with_image = _step(model, image)
    assert set(bare) < set(with_image)  # without the stand-in a text batch leaves the vision path without gradients

    install_stand_in(model, processor, 512 * 512)
    stand_in_loss, stand_in_logits, order = _step(model, text)
    assert torch.equal(stand_in_loss, loss) and torch.equal(stand_in_logits, logits)
    assert order == with_image  # the same parameters, in the same order, as a batch with an image
    assert _step(model, image)[2] == with_image  # and a real image does not run the stand-in as well


def _pair_step(model, batch) -> tuple[torch.Tensor, list[str]]:
    """vlm_preference's forward (images encoded before it, once per pair) over the batch's rows twice."""
    from visiontune.vlm.preference_forward import IMAGE_INPUTS, pair_logits

    pair = {k: v if k in IMAGE_INPUTS else torch.cat([v, v]) for k, v in batch.items() if k != "labels"}
    order: list[str] = []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda _, n=n: order.append(n)) for n, p in named]
    model.zero_grad(set_to_none=True)
    logits = pair_logits(model, pair)
    logits.float().logsumexp(-1).mean().backward()
    for hook in hooks:
        hook.remove()
    return logits.detach(), order


@pytest.mark.parametrize("kind", ["qwen2_vl", "assembled"])
def test_stand_in_in_the_preference_forward(kind, mixed, tmp_path):
    from visiontune.vlm.mixed_batches import install_stand_in

    model, processor = _model(kind, tmp_path)
    for p in model.parameters():
        p.requires_grad_(True)
    image, text = _batches(processor, mixed)
    logits, _ = _pair_step(model, text)
    _, with_image = _pair_step(model, image)
    install_stand_in(model, processor, 512 * 512)
    stand_in_logits, order = _pair_step(model, text)
    assert torch.equal(stand_in_logits, logits)
    assert order == with_image and _pair_step(model, image)[1] == with_image


# ---- two ranks -------------------------------------------------------------------------------------------------

# Prepended to the per-rank runner of tests/run/test_sharded_ranks.py: sequential sampling, so with batch 1 rank 0
# trains records 0, 2, 4 (images) and rank 1 records 1, 3, 5 (text only); and a record of which steps had images.
PATCH = """
import json, os, sys
from transformers import Trainer, TrainingArguments

_post_init = TrainingArguments.__post_init__

def _sequential(self):
    _post_init(self)
    self.train_sampling_strategy = "sequential"

TrainingArguments.__post_init__ = _sequential
_training_step = Trainer.training_step

def _images(self, model, inputs, num_items_in_batch=None):
    out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir="))
    with open(out + "-images-rank" + os.environ["RANK"] + ".jsonl", "a") as f:
        f.write(json.dumps("pixel_values" in inputs) + "\\n")
    return _training_step(self, model, inputs, num_items_in_batch)

Trainer.training_step = _images
"""

SMALL_BUCKETS = {"reduce_bucket_size": 4096, "allgather_bucket_size": 4096, "stage3_prefetch_bucket_size": 4096}


def _deepspeed_file(stage: str, folder: Path) -> Path:
    """The built-in config with gradient buckets of 4,096 values: they fill and reduce many times in one backward,
    so ranks whose gradients came in another order would reduce other parameters together."""
    from visiontune.run.config import deepspeed_file

    config = json.loads(deepspeed_file(stage).read_text())
    zero = config["zero_optimization"]
    zero |= {k: v for k, v in SMALL_BUCKETS.items() if k != "allgather_bucket_size" or zero["stage"] == 2}
    if zero["stage"] == 3:
        zero |= {"stage3_param_persistence_threshold": 0}  # every parameter gathered by its module's forward
    path = folder / f"{stage}-small-buckets.json"
    path.write_text(json.dumps(config))
    return path


def _mixed_runs(folder: Path, vlm: Path, lm: Path, clip: Path, backend: str | None) -> list[dict]:
    """vlm_sft (every part trains), vlm_preference and an assembled VLM's instruct stage on mixed records, one step
    each on each rank; the assembled one starts from an align run on images only."""
    records = _write_mixed(folder)
    pairs = folder / "pairs.jsonl"
    from visiontune.testing.fixtures import preference_pairs

    convs = [r | {"images": r.get("images", [])} for r in records]
    pairs.write_text("\n".join(json.dumps(p) for p in preference_pairs(convs)) + "\n")
    captions = folder / "captions.csv"
    captions.write_text("image,caption\n" + "".join(f"{i}.png,a {COLOURS[0][0]} image\n" for i in (0, 2, 4, 6)))
    common = ["train.max_steps=3", "train.batch_size=1", "train.grad_accum=1", "train.logging_steps=1"]
    common += ["train.precision=fp32"]
    common += [f"train.deepspeed={backend}"] if backend else []
    data = [f"data.train={folder / 'data.json'}", "data.val_split=0", "data.group_by_length=false"]
    runs = {
        "sft": ["smolvlm-lora", f"model={vlm}", *data, "data.dataset_name=null", "tune.method=full"]
        + ["tune.train_vision=true"],
        "preference": ["qwen2-vl-dpo", f"model={vlm}", f"data.train={pairs}", "data.val_split=0"],
        "align": ["mnist-align", f"vision={clip}", f"language={lm}", f"data.train={captions}", "data.val=null"]
        + ["data.val_split=0", "data.limit=4", "image_size=null"],
        "instruct": ["mnist-instruct", f"init_from={folder / 'align'}", *data[:2], "data.val=null"]
        + ["tune.language=full"],
    }
    return [
        {"argv": [*argv, f"output_dir={folder / name}", *common], "out": str(folder / name)}
        for name, argv in runs.items()
    ]


def _launch(runs: list[dict], folder: Path) -> None:
    from tests import two_ranks

    # the DeepSpeed worker (its reset is harmless under DDP); the timeout: before the stand-in, ZeRO-3 ranks waited
    # for each other's gathers forever
    two_ranks.launch("deepspeed", runs, folder, 1200, before=PATCH)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    from tests.conftest import fixture_seed
    from visiontune.testing.fixtures import tiny_clip
    from visiontune.testing.vlm_fixtures import tiny_causal_lm, tiny_vlm

    out = tmp_path_factory.mktemp("mixed-parts")
    with fixture_seed():
        return {
            "vlm": tiny_vlm("qwen2_vl", out / "vlm"),
            "lm": tiny_causal_lm("qwen2", out / "lm"),
            "clip": tiny_clip(out / "clip"),
        }


@pytest.fixture(scope="module", params=["ddp", "zero2", "zero3"])
def trained(request, parts, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    backend = None
    if request.param != "ddp":
        pytest.importorskip("deepspeed")
        backend = str(_deepspeed_file(request.param, folder))
    _launch(_mixed_runs(folder, parts["vlm"], parts["lm"], parts["clip"], backend), folder)
    return request.param, folder


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "preference", "instruct"])
def test_rank_with_images_and_rank_without_train_in_step(trained, task):
    backend, folder = trained
    run = folder / task
    images = [[json.loads(x) for x in Path(f"{run}-images-rank{r}.jsonl").read_text().split()] for r in (0, 1)]
    assert images == [[True] * 3, [False] * 3], images  # every step: rank 0 an image, rank 1 none
    steps = [json.loads((run / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    engine = "DistributedDataParallel" if backend == "ddp" else "DeepSpeedEngine"
    assert steps[0] == steps[1] == [engine] * 3, steps
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], f"{task}: the ranks ended with other weights"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), rows
