"""Fixtures the detection tests share: one torch thread, the generated box and instance sets, a tiny recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visiontune.testing.detect_fixtures import write_detection_sets, write_instance_sets


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models and images: one torch thread is several times faster than two on cores other jobs share (as in a
    DataLoader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def box_sets(tmp_path_factory) -> dict[str, Path]:
    """The generated detection sets in every format (COCO, YOLO, VOC...), boxes only."""
    return write_detection_sets(tmp_path_factory.mktemp("boxes"))


@pytest.fixture(scope="module")
def instance_sets(tmp_path_factory) -> dict[str, Path]:
    """The generated sets with instance masks (COCO polygons and RLE, YOLO polygons)."""
    return write_instance_sets(tmp_path_factory.mktemp("instances"))


def detect_recipe(fixtures_dir: Path, sets: dict, out: Path, **sections) -> dict:
    """A two-epoch recipe on the tiny timm CNN (FCOS unless `detector=` says otherwise); `sections` update it, a dict
    merging into the section of that name."""
    recipe = {
        "task": "detect",
        "model": f"timm:local-dir:{fixtures_dir / 'timm-cnn'}",
        "fpn_channels": 32,
        "output_dir": str(out),
        "data": {
            "train": str(sets["coco-train"]),
            "val": str(sets["coco-val"]),
            "image_size": 64,
            "augment": {"preset": "none"},
            "workers": 0,
        },
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0, "logging_steps": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    return recipe
