"""data.packing: a batch's records in one padding-free row give every record the loss, and the batch the gradients,
of the padded batch, for every VLM family (Qwen2-VL / Qwen2.5-VL with their 3-D rotary positions); a packed run
trains end to end with no padding."""

import json
from pathlib import Path

import pytest
import torch

from visiontune.vlm.collate import VlmCollator
from visiontune.vlm.conversations import read_conversations
from visiontune.vlm.packing import PackedCollator, rope_index_of
from visiontune.vlm.tokenize import IGNORE, tokenize

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "idefics3", "llava"]


def _per_record_losses(logits: torch.Tensor, labels: torch.Tensor, starts: list[int]) -> list[torch.Tensor]:
    """Token losses (next-token cross-entropy over trained positions) of each record: rows of a padded batch, or
    the spans of a packed row starting at `starts`."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lb, ignore_index=IGNORE, reduction="none")
    if logits.shape[0] > 1:
        return [row[lab != IGNORE] for row, lab in zip(losses, lb, strict=True)]
    bounds = [*starts, labels.shape[1]]
    return [losses[0, a : b - 1][lb[0, a : b - 1] != IGNORE] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_gives_each_record_its_padded_loss_and_the_same_gradients(family, records, tmp_path):
    from tests.vlm.conftest import sdpa_model_and_items

    model, processor, tokens, items = sdpa_model_and_items(family, records, tmp_path)
    assert len({len(t) for t in tokens}) == 3  # different lengths: the padded batch really pads

    results = []
    for collator in (VlmCollator(processor, 512 * 512), PackedCollator(processor, 512 * 512, rope_index_of(model))):
        batch = collator(items)
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        starts = [sum(len(t) for t in tokens[:k]) for k in range(3)]
        losses = _per_record_losses(out.logits.detach(), batch["labels"], starts)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((batch, out.loss.detach(), losses, grads))
    (padded, loss_p, per_p, grads_p), (packed, loss_k, per_k, grads_k) = results
    assert packed["input_ids"].shape == (1, sum(len(t) for t in tokens))  # one row, no padding
    assert "attention_mask" not in packed and padded["attention_mask"].eq(0).any()
    if family.startswith("qwen"):
        assert packed["position_ids"].shape[0] == 4  # text positions + the 3-D rotary ones
    for a, b in zip(per_p, per_k, strict=True):
        assert a.numel() == b.numel() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_k, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_k.keys() == grads_p.keys()
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_k[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_positions_restart_at_every_record(records, tmp_path):
    from transformers import AutoProcessor

    from visiontune.testing.vlm_fixtures import tiny_vlm

    processor = AutoProcessor.from_pretrained(tiny_vlm("llava", tmp_path / "llava"))
    convs = read_conversations(str(records))
    tokens = [tokenize(processor, c, 512, 512 * 512, "assistant") for c in convs]
    items = [
        {"input_ids": t.input_ids, "labels": t.labels, "extra": t.extra, "conv": c}
        for t, c in zip(tokens, convs, strict=True)
    ]
    batch = PackedCollator(processor, 512 * 512)(items)
    expected = torch.cat([torch.arange(len(t)) for t in tokens])
    assert torch.equal(batch["position_ids"][0], expected)
    starts = [sum(len(t) for t in tokens[:k]) for k in range(3)]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)  # no record learns the next one's first token
    assert batch["use_cache"] is False


@pytest.mark.random_model
def test_a_packed_run_trains_without_padding(records, tmp_path, write_recipe, cli):
    from visiontune.testing.vlm_fixtures import tiny_vlm

    recipe = {
        "task": "vlm_sft",
        "model": str(tiny_vlm("qwen2_vl", tmp_path / "qwen2_vl")),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(records), "val_split": 0, "packing": True},
        "train": {"max_steps": 2, "batch_size": 3, "logging_steps": 1},
    }
    code, _, err = cli("train", write_recipe(recipe))
    assert code == 0, err
    logs = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    padding = [r["padding_fraction"] for r in logs if "padding_fraction" in r]
    assert padding and all(p == 0 for p in padding)
