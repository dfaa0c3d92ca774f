"""`detector: maskrcnn` on two DDP ranks: the ranks train in step and every validation image is scored once, its
masks (RLE records) gathered from both ranks into the mask metrics."""

from __future__ import annotations

import json

from tests.conftest import train_two_ranks
from tests.detect.conftest import detect_recipe
from visiontune.detect.config import MASK_METRICS


def test_two_ranks_train_in_step_and_score_every_mask_once(fixtures_dir, instance_sets, write_recipe, tmp_path):
    recipe = detect_recipe(
        fixtures_dir, instance_sets, tmp_path / "ddp", detector="maskrcnn", train={"epochs": 1, "batch_size": 2}
    )
    ranks = train_two_ranks(write_recipe(recipe))
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["samples_seen"] == 4 for r in ranks)
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "ranks ended with different weights"
    after = json.loads((tmp_path / "ddp" / "eval" / "after.json").read_text())
    assert set(MASK_METRICS) <= set(after["metrics"])
    assert sorted(s["image_id"] for s in after["samples"]) == [0, 1, 2, 3]  # every val image scored once
    assert all(len(s["masks"]) == len(s["boxes"]) for s in after["samples"])  # each detection kept its mask
