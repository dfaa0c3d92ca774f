"""data.packing for vlm_preference and vlm_assemble: a batch in one padding-free row gives every record (every
answer of every pair) the log-probs / loss of the padded batch and the batch the same gradients — for every
vlm_sft family (Qwen2-VL / Qwen2.5-VL with their 3-D rotary positions) and for assembled models on a Qwen2 and a
Llama LM; packed runs of both tasks train end to end with no padding."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from visiontune.recipe import parse_config
from visiontune.registry import TASKS

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "idefics3", "llava")
COLOURS = ("red", "green", "blue")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Three pairs whose images (so Qwen's image token counts) and answers differ in length: the padded batch pads."""
    root = tmp_path_factory.mktemp("packed-pairs")
    rows = []
    for i in range(3):
        Image.new("RGB", (32 + 32 * i, 32), (200 * (i % 2), 60, 90)).save(root / f"{i}.png")
        rows.append(
            {
                "prompt": [{"role": "user", "content": "<image>Which colour?" + " Say it." * i}],
                "chosen": [{"role": "assistant", "content": " ".join([COLOURS[i]] * (1 + i))}],
                "rejected": [{"role": "assistant", "content": " ".join([COLOURS[(i + 1) % 3]] * (3 - i))}],
                "images": [f"{i}.png"],
            }
        )
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "pairs.jsonl"


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_pairs_give_each_answer_its_padded_logps_and_the_same_loss_and_gradients(family, pairs, tmp_path):
    from transformers import AutoModelForImageTextToText

    from visiontune.testing.vlm_fixtures import tiny_vlm
    from visiontune.vlm.packed_attention import use_packed_attention
    from visiontune.vlm.packing import PackedPairCollator, rope_index_of
    from visiontune.vlm.preference import PairCollator, PairDataset
    from visiontune.vlm.preference_forward import answer_logps
    from visiontune.vlm.preference_loss import preference_loss

    path = tiny_vlm(family, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    cfg = parse_config(
        {
            "task": "vlm_preference",
            "model": str(path),
            "output_dir": str(tmp_path / "run"),
            "data": {"train": str(pairs), "val_split": 0, "max_length": 256},
        }
    )
    prepared = TASKS["vlm_preference"].create().prepare(cfg)
    dataset = PairDataset(prepared.data.train_tokens, prepared.data.train)
    items = [dataset[i] for i in range(len(dataset))]
    lengths = {len(i[side]["input_ids"]) for i in items for side in ("chosen", "rejected")}
    assert len(lengths) > 2  # the padded batch really pads
    padded = PairCollator(prepared.processor, cfg.data.max_image_pixels)(items)
    packed = PackedPairCollator(prepared.processor, cfg.data.max_image_pixels, rope_index_of(model))(items)
    assert packed["input_ids"].shape == (1, sum(len(i[s]["input_ids"]) for i in items for s in ("chosen", "rejected")))
    assert "attention_mask" not in packed and padded["attention_mask"].eq(0).any()
    if family.startswith("qwen"):
        assert packed["position_ids"].shape[0] == 4  # text positions + the 3-D rotary ones

    results = []
    for batch in (padded, packed, packed):  # the last: attention per record (vlm/packed_attention.py)
        if len(results) == 2:
            assert use_packed_attention(model)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model.zero_grad()
        policy = answer_logps(model, inputs, batch["labels"])
        ref = torch.tensor([0.5, -0.5, 1.0])  # any fixed reference: the loss must come out the same
        loss, _ = preference_loss(policy, ref, -ref, kind="sigmoid", beta=0.1, rpo_alpha=0.5)  # RPO: token means
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((policy, loss.detach(), grads))
    pol_p, loss_p, grads_p = results[0]
    for pol_k, loss_k, grads_k in results[1:]:
        assert torch.equal(pol_k.tokens, pol_p.tokens) and pol_p.tokens.min() > 0
        torch.testing.assert_close(pol_k.logps, pol_p.logps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pol_k.per_token[pol_k.mask], pol_p.per_token[pol_p.mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss_k, loss_p, rtol=1e-5, atol=1e-6)
        assert grads_k.keys() == grads_p.keys() and grads_p
        for name, grad in grads_p.items():
            torch.testing.assert_close(grads_k[name], grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("lm", ["qwen2", "llama"])
def test_packed_assembled_rows_give_each_record_its_padded_loss_and_the_same_gradients(lm, tmp_path):
    from visiontune.testing.fixtures import tiny_clip
    from visiontune.testing.vlm_fixtures import tiny_causal_lm
    from visiontune.vlm.assembled import build_assembled
    from visiontune.vlm.collate import VlmCollator
    from visiontune.vlm.conversations import Conversation, Turn
    from visiontune.vlm.packed_attention import use_packed_attention
    from visiontune.vlm.packing import PackedCollator, rope_index_of
    from visiontune.vlm.tokenize import IGNORE, tokenize

    parts = str(tiny_clip(tmp_path / "clip")), str(tiny_causal_lm(lm, tmp_path / lm))
    model, processor = build_assembled(*parts, {"kind": "mlp2x_gelu"})
    model.language.requires_grad_(True)
    convs = []
    for i in range(3):
        question = "<image>\nWhich colour?" + " Say it." * i
        turns = [Turn("user", question), Turn("assistant", " ".join(["red"] * (1 + 2 * i)))]
        convs.append(Conversation(turns, [Image.new("RGB", (32, 32), (60 * i, 90, 30))], f"r{i}"))
    tokens = [tokenize(processor, c, 512, 512 * 512, "assistant") for c in convs]
    assert len({len(t) for t in tokens}) == 3
    items = [
        {"input_ids": t.input_ids, "labels": t.labels, "extra": t.extra, "conv": c}
        for t, c in zip(tokens, convs, strict=True)
    ]
    assert rope_index_of(model) is None

    results = []
    packed_collator = PackedCollator(processor, 512 * 512)
    for collator in (VlmCollator(processor, 512 * 512), packed_collator, packed_collator):
        if len(results) == 2:  # the last: attention per record (vlm/packed_attention.py)
            assert use_packed_attention(model)
        batch = collator(items)
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        lg, lb = out.logits[:, :-1].detach().float(), batch["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lb, ignore_index=IGNORE, reduction="none")
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((batch, out.loss.detach(), token_loss[lb != IGNORE], grads))
    padded, loss_p, tok_p, grads_p = results[0]
    for packed, loss_k, tok_k, grads_k in results[1:]:
        assert packed["input_ids"].shape == (1, sum(len(t) for t in tokens))
        assert "attention_mask" not in packed and padded["attention_mask"].eq(0).any()
        torch.testing.assert_close(tok_k, tok_p, rtol=1e-4, atol=1e-5)  # each record's tokens, in record order
        torch.testing.assert_close(loss_k, loss_p, rtol=1e-5, atol=1e-6)
        assert grads_k.keys() == grads_p.keys() and any("language" in n for n in grads_p)
        for name, grad in grads_p.items():
            torch.testing.assert_close(grads_k[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def _padding(run: Path) -> list[float]:
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["padding_fraction"] for r in logs if "padding_fraction" in r]


@pytest.mark.random_model
def test_packed_preference_and_assemble_runs_train_without_padding(pairs, tmp_path, write_recipe, cli):
    from visiontune.testing.fixtures import tiny_clip
    from visiontune.testing.vlm_fixtures import tiny_causal_lm, tiny_vlm

    captions = tmp_path / "captions.csv"
    lines = ["image,caption"]
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 90, 30)).save(tmp_path / f"c{i}.png")
        lines.append(f"c{i}.png,a square" + " of colour" * i)
    captions.write_text("\n".join(lines))
    short = {"max_steps": 2, "batch_size": 3, "logging_steps": 1}
    recipes = {
        "preference": {
            "task": "vlm_preference",
            "model": str(tiny_vlm("qwen2_vl", tmp_path / "qwen2_vl")),
            "data": {"train": str(pairs), "val_split": 0, "max_length": 256, "packing": True},
            "train": short,
        },
        "assemble": {
            "task": "vlm_assemble",
            "stage": "align",
            "vision": str(tiny_clip(tmp_path / "clip")),
            "language": str(tiny_causal_lm("qwen2", tmp_path / "qwen2")),
            "data": {"train": str(captions), "val_split": 0, "packing": True},
            "train": short,
        },
    }
    for name, recipe in recipes.items():
        recipe["output_dir"] = str(tmp_path / name)
        code, _, err = cli("train", write_recipe(recipe))
        assert code == 0, err
        padding = _padding(tmp_path / name)
        assert padding and all(p == 0 for p in padding), name
        rank = json.loads((tmp_path / name / "ranks" / "rank0.json").read_text())
        assert rank["samples_seen"] == 6, name  # records (pairs) counted, not packed rows
