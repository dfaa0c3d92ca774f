"""On the same pairs and weights, vlm_preference's DPO loss equals TRL's `DPOTrainer.compute_loss` on a Qwen2-VL
fixture (pixel_values + image_grid_thw) and an Idefics3 fixture, with the same token ids and answer tokens. (LLaVA-1.5
differs by design: its template ends an answer with no token, and vlm_sft / vlm_preference add eos, TRL does not.)"""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """TRL's conversational layout (image blocks in the prompt's content), which both sides read."""
    root = tmp_path_factory.mktemp("trl-pairs")
    records = []
    for i, (name, wrong, rgb) in enumerate([("red", "green", (220, 30, 30)), ("blue", "red", (30, 30, 220))]):
        Image.new("RGB", (32, 32), rgb).save(root / f"{i}.png")
        question = [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]
        records.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": name}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
                "images": [f"{i}.png"],
            }
        )
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root / "pairs.jsonl"


def _trl_loss(model, ref, processor, pairs: Path, out: Path) -> tuple[float, list, list]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    images = [[Image.open(pairs.parent / p).convert("RGB") for p in r["images"]] for r in rows]
    data = Dataset.from_dict({**{k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}, "images": images})
    args = DPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        report_to="none",
        beta=0.1,
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model.eval(), batch)
    pick = [(batch["input_ids"][i], batch[key][i]) for key in ("attention_mask", "completion_mask") for i in range(4)]
    rows, answers = ([ids[m.bool()].tolist() for ids, m in pick[k : k + 4]] for k in (0, 4))
    return float(loss), rows, answers


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_dpo_loss_equals_trl_dpotrainer_on_the_same_batch(family, pairs, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from visiontune.recipe import parse_config
    from visiontune.registry import TASKS
    from visiontune.testing.vlm_fixtures import tiny_vlm
    from visiontune.vlm.preference import PairCollator, PairDataset
    from visiontune.vlm.preference_forward import answer_logps
    from visiontune.vlm.preference_loss import preference_loss
    from visiontune.vlm.tokenize import IGNORE

    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    folder = tiny_vlm(family, tmp_path / "model")
    ref = AutoModelForImageTextToText.from_pretrained(folder).eval()
    policy = AutoModelForImageTextToText.from_pretrained(folder).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that has moved away from the reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = parse_config(
        {
            "task": "vlm_preference",
            "model": str(folder),
            "output_dir": str(tmp_path / "run"),
            "data": {"train": str(pairs), "val_split": 0},
            "tune": {"method": "full"},
        }
    )
    prepared = TASKS["vlm_preference"].create().prepare(cfg)
    items = PairDataset(prepared.data.train_tokens, prepared.data.train)
    batch = PairCollator(prepared.processor, cfg.data.max_image_pixels)([items[0], items[1]])
    labels = batch.pop("labels")
    with torch.no_grad():
        ours, _ = preference_loss(
            answer_logps(policy, dict(batch), labels),
            *answer_logps(ref, dict(batch), labels).logps.chunk(2),
            kind="sigmoid",
            beta=0.1,
        )
    theirs, trl_rows, trl_answers = _trl_loss(policy, ref, prepared.processor, pairs, tmp_path / "trl")
    our_rows = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    our_answers = [ids[label != IGNORE].tolist() for ids, label in zip(batch["input_ids"], labels, strict=True)]
    assert sorted(trl_rows) == sorted(our_rows) and sorted(trl_answers) == sorted(our_answers)  # same tokens scored
    assert ours.item() == pytest.approx(theirs, abs=1e-5)
