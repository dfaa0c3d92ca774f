"""A key the recipe writes must act under the recipe's other settings, or be refused at validation with one sentence
naming the key and what would make it act ("a recipe key either acts or is refused"; see run/config.py:Inert).

Each case: a recipe with the key written where it would act on nothing (refused, the message names the key), and
the same key under the setting that makes it act (valid). Keys left at their defaults never trigger a refusal.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from visiontune.core.errors import RecipeError
from visiontune.recipe import parse_config

BASES: dict[str, dict[str, Any]] = {
    "classify": {"model": "timm:resnet18", "data": {"train": "images"}},
    "clip_classify": {"model": "clip", "data": {"train": "images"}},
    "clip_continual": {"model": "clip", "tasks": [{"name": "a", "train": "a"}, {"name": "b", "train": "b"}]},
    "clip_contrastive": {"model": "clip", "data": {"train": "captions.csv"}},
    "vlm_sft": {"model": "vlm", "data": {"train": "convs.json"}},
    "vlm_assemble": {"stage": "align", "vision": "clip", "language": "lm", "data": {"train": "captions.csv"}},
    "detect": {"model": "builtin:efficientnet-lite0", "data": {"train": "coco.json"}},
    "segment": {"model": "builtin:efficientnet-lite0", "data": {"train": "masks"}},
}
BOTH_TASKS_VAL = [{"name": "a", "train": "a", "val": "va"}, {"name": "b", "train": "b", "val": "vb"}]

# (task, what the inert recipe writes, the key its refusal must name, what makes the key act)
CASES: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    ("classify", {"train.momentum": 0.8}, "train.momentum", {"train.optimizer": "sgd"}),
    ("classify", {"tune.lora.r": 4}, "tune.lora.r", {"tune.method": "lora"}),
    ("classify", {"tune.lora": {"alpha": 8, "dropout": 0.0}}, "tune.lora.alpha", {"tune.method": "lora"}),
    ("classify", {"tune.unfreeze": [{"epoch": 0, "blocks": 1}]}, "tune.unfreeze", {"tune.method": "gradual_unfreeze"}),
    ("classify", {"tune.method": "lora", "tune.layer_decay": 0.7}, "tune.layer_decay", {"tune.method": "full"}),
    (
        "classify",
        {"tune.method": "linear_probe", "tune.layer_decay": 0.7},
        "tune.layer_decay",
        {"tune.method": "gradual_unfreeze"},
    ),
    (
        "classify",
        {"data.augment.preset": "none", "data.augment.hflip": 0.0},
        "data.augment.hflip",
        {"data.augment.preset": "light"},
    ),
    ("classify", {"data.augment.policy": "trivialaugment"}, "data.augment.policy", {"data.augment.preset": "strong"}),
    (
        "classify",
        {"model": "builtin:efficientnet-lite0", "pretrained": False},
        "pretrained",
        {"model": "timm:resnet18"},
    ),
    ("classify", {"model": "/models/vit", "pretrained": False}, "pretrained", {"model": "timm:local-dir:/models/vit"}),
    (
        "classify",
        {"model": "google/vit-base-patch16-224", "pretrained": False},
        "pretrained",
        {"model": "timm:vit_tiny"},
    ),
    ("classify", {"data.val": "val", "data.val_split": 0.2}, "data.val_split", {"data.val": None}),
    ("classify", {"track.wandb_project": "p"}, "track.wandb_project", {"track.wandb": True}),
    ("classify", {"track.wandb_mode": "online"}, "track.wandb_mode", {"track.wandb": True}),
    ("clip_classify", {"tune.lora.r": 4}, "tune.lora.r", {"tune.method": "l_lora"}),
    (
        "clip_classify",
        {"tune.method": "l_lora", "tune.lora.dropout": 0.2},
        "tune.lora.dropout",
        {"tune.method": "lora"},
    ),
    ("clip_classify", {"skip_training": True, "train.lr": 1e-4}, "train.lr", {"skip_training": False}),
    ("clip_classify", {"skip_training": True, "tune.method": "lora"}, "tune.method", {"skip_training": False}),
    ("clip_classify", {"skip_training": True, "wise_ft": {}}, "wise_ft", {"skip_training": False}),
    ("clip_classify", {"skip_training": True, "export_state_to": "v.pt"}, "export_state_to", {"skip_training": False}),
    (
        "clip_classify",
        {"skip_training": True, "data.augment.preset": "strong"},
        "data.augment.preset",
        {"skip_training": False},
    ),
    (
        "clip_classify",
        {"data.augment.hflip": 0.2, "data.augment.preset": "none"},
        "data.augment.hflip",
        {"data.augment.preset": "strong"},
    ),
    ("clip_continual", {"tune.lora.alpha": 8}, "tune.lora.alpha", {"tune.method": "lora"}),
    (
        "clip_continual",
        {"tasks": BOTH_TASKS_VAL, "data.val_split": 0.3},
        "data.val_split",
        {"tasks": BASES["clip_continual"]["tasks"]},
    ),
    ("clip_continual", {"train.momentum": 0.5}, "train.momentum", {"train.optimizer": "sgd"}),
    (
        "clip_contrastive",
        {"data.zero_shot_class_names": ["a", "b"]},
        "data.zero_shot_class_names",
        {"data.zero_shot": "labelled"},
    ),
    ("clip_contrastive", {"data.templates": ["a {}"]}, "data.templates", {"data.zero_shot": "labelled"}),
    ("clip_contrastive", {"data.val": "val.csv", "data.val_split": 0.2}, "data.val_split", {"data.val": None}),
    (
        "clip_contrastive",
        {"data.augment.hflip": 0.3, "data.augment.preset": "none"},
        "data.augment.hflip",
        {"data.augment.preset": "light"},
    ),
    ("vlm_sft", {"tune.method": "full", "tune.lora_r": 8}, "tune.lora_r", {"tune.method": "qlora"}),
    ("vlm_sft", {"tune.method": "full", "tune.lora_target": ["q_proj"]}, "tune.lora_target", {"tune.method": "lora"}),
    ("vlm_sft", {"tune.train_language": False}, "tune.train_language", {"tune.method": "full"}),
    (
        "vlm_sft",
        {"data.val_split": 0, "train.early_stopping_patience": 2},
        "train.early_stopping_patience",
        {"data.val_split": 0.1},
    ),
    (
        "vlm_sft",
        {"data.val_split": 0, "train.metric": "exact_match"},
        "train.metric",
        {"data.val_split": None, "data.val": "val.json"},
    ),
    ("vlm_sft", {"data.val_split": 0, "eval.max_samples": 5}, "eval.max_samples", {"data.val_split": 0.1}),
    ("vlm_sft", {"data.val": "val.json", "data.val_split": 0.2}, "data.val_split", {"data.val": None}),
    ("vlm_assemble", {"tune.language": "full"}, "tune.language", {"stage": "instruct"}),
    ("vlm_assemble", {"tune.train_projector": False}, "tune.train_projector", {"stage": "instruct"}),
    ("vlm_assemble", {"init_from": "runs/align"}, "init_from", {"stage": "instruct", "vision": None, "language": None}),
    ("vlm_assemble", {"stage": "instruct", "init_from": "runs/align"}, "vision", {"init_from": None}),
    (
        "vlm_assemble",
        {"stage": "instruct", "init_from": "runs/align", "projector.kind": "linear"},
        "projector.kind",
        {"init_from": None},
    ),
    (
        "vlm_assemble",
        {"stage": "instruct", "init_from": "runs/align", "drop_cls": False, "vision": None, "language": None},
        "drop_cls",
        {"stage": "align", "init_from": None, "vision": "clip", "language": "lm"},
    ),
    (
        "vlm_assemble",
        {"stage": "instruct", "tune.language": "full", "tune.lora_r": 8},
        "tune.lora_r",
        {"tune.language": "lora"},
    ),
    ("vlm_assemble", {"stage": "instruct", "data.prompt": "Caption:"}, "data.prompt", {"stage": "align"}),
    (
        "vlm_assemble",
        {"scheduled_sampling": {"schedule": "linear", "k": 3.0}},
        "scheduled_sampling.k",
        {"scheduled_sampling.schedule": "exponential", "scheduled_sampling.k": 0.9},
    ),
    ("vlm_assemble", {"data.val_split": 0, "eval.max_new_tokens": 8}, "eval.max_new_tokens", {"data.val_split": 0.05}),
    ("vlm_assemble", {"data.val": "val.csv", "data.val_split": 0.2}, "data.val_split", {"data.val": None}),
    ("detect", {"model": "detr", "detector": "retinanet"}, "detector", {"model": "timm:resnet18"}),
    ("detect", {"model": "runs/detect", "fpn_channels": 128}, "fpn_channels", {"model": "builtin:efficientnet-lite0"}),
    (
        "detect",
        {"tune.method": "linear_probe", "tune.freeze_backbone": True},
        "tune.freeze_backbone",
        {"tune.method": "full"},
    ),
    (
        "detect",
        {"model": "detr", "tune.lora.r": 4},
        "tune.lora.r",
        {"tune.method": "lora"},
    ),
    ("detect", {"tune.unfreeze": [{"epoch": 0, "blocks": 1}]}, "tune.unfreeze", {"tune.method": "gradual_unfreeze"}),
    (
        "detect",
        {"data.augment.preset": "none", "data.augment.hflip": 0.0},
        "data.augment.hflip",
        {"data.augment.preset": "light"},
    ),
    ("detect", {"data.val": "val.json", "data.val_split": 0.2}, "data.val_split", {"data.val": None}),
    ("segment", {"model": "nvidia/mit-b0", "decoder": "unet"}, "decoder", {"model": "timm:resnet18"}),
    ("segment", {"model": "runs/segment", "decoder_channels": 32}, "decoder_channels", {"model": "timm:resnet18"}),
    ("segment", {"eval.stride": 0.5}, "eval.stride", {"eval.mode": "slide"}),
    (
        "segment",
        {"data.palette": {"road": [128, 64, 128]}, "data.reduce_labels": True},
        "data.reduce_labels",
        {"data.palette": None},
    ),
    ("segment", {"model": "nvidia/mit-b0", "tune.lora.r": 4}, "tune.lora.r", {"tune.method": "lora"}),
    ("segment", {"tune.unfreeze": [{"epoch": 0, "blocks": 1}]}, "tune.unfreeze", {"tune.method": "gradual_unfreeze"}),
    (
        "segment",
        {"data.augment.preset": "none", "data.augment.hflip": 0.0},
        "data.augment.hflip",
        {"data.augment.preset": "strong"},
    ),
    ("segment", {"data.val": "val", "data.val_split": 0.2}, "data.val_split", {"data.val": None}),
]


def recipe(task: str, settings: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {"task": task, "output_dir": "runs/x", **copy.deepcopy(BASES[task])}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)  # "without it": the key is left out, as a user would
        else:
            node[leaf] = copy.deepcopy(value)
    return raw


def _ids(case: tuple) -> str:
    return f"{case[0]}:{case[2]}"


@pytest.mark.parametrize(("task", "inert", "key", "enabling"), CASES, ids=[_ids(c) for c in CASES])
def test_inert_key_is_refused_naming_it(task, inert, key, enabling):
    with pytest.raises(RecipeError) as err:
        parse_config(recipe(task, inert), source="r.yaml")
    lines = str(err.value).splitlines()
    named = {line: _named(line) for line in lines}
    line = next((line for line, keys in named.items() if key in keys), None)
    assert line is not None, f"no refusal names {key}: {lines}"
    assert line.startswith("r.yaml: ") and "; remove " in line and line.endswith("."), line


def _named(line: str) -> set[str]:
    """The keys a refusal sentence starts with: "r.yaml: a.b and c act only ..." -> {a.b, c}."""
    names = line.removeprefix("r.yaml: ").partition(" only ")[0].rsplit(" ", 1)[0]  # drop "acts" / "act"
    return {n.strip() for part in names.split(" and ") for n in part.split(",")}


@pytest.mark.parametrize(("task", "inert", "key", "enabling"), CASES, ids=[_ids(c) for c in CASES])
def test_same_key_acts_under_the_enabling_setting(task, inert, key, enabling):
    parse_config(recipe(task, {**inert, **enabling}), source="r.yaml")


@pytest.mark.parametrize("task", sorted(BASES))
def test_defaults_never_trigger(task):
    """Every base recipe leaves inert keys at their defaults (momentum under AdamW, LoRA settings under full...)."""
    parse_config(recipe(task, {}))


def test_a_key_written_as_null_is_left_out():
    """null is what an optional key means when it is not written, so it is not refused either."""
    parse_config(recipe("classify", {"tune.method": "lora", "tune.layer_decay": None}))
    raw = recipe("classify", {"tune.method": "lora"})
    raw["tune"]["layer_decay"] = None
    raw["data"]["augment"] = {"preset": "none", "hflip": None}
    parse_config(raw)


def test_every_inert_key_is_named_once():
    raw = recipe("classify", {"train.momentum": 0.5, "tune.lora": {"r": 4, "alpha": 8}})
    with pytest.raises(RecipeError) as err:
        parse_config(raw, source="r.yaml")
    assert str(err.value).splitlines() == [
        "r.yaml: tune.lora.r and tune.lora.alpha act only with tune.method: lora; remove them or set "
        "tune.method: lora.",
        "r.yaml: train.momentum acts only with train.optimizer: sgd; remove it or set train.optimizer: sgd.",
    ]


def test_configs_built_from_a_full_dump_are_not_refused():
    """clip_continual builds each task's config from the shared section's full dump (every key written by
    construction): only a recipe is checked for inert keys."""
    from pathlib import Path

    from visiontune.clip.continual import _task_config

    cfg = parse_config(recipe("clip_continual", {"tasks": [BOTH_TASKS_VAL[0], BASES["clip_continual"]["tasks"][1]]}))
    task_cfg = _task_config(cfg, cfg.tasks[0], Path("runs/x/a"))  # val given, val_split and augment written too
    assert task_cfg.data.val == "va" and task_cfg.data.augment.preset == "none"


def test_validate_cli_prints_the_sentence_alone(tmp_path, cli):
    path = tmp_path / "r.yaml"
    path.write_text("task: classify\nmodel: timm:resnet18\noutput_dir: runs/x\ndata: {train: images}\n")
    code, _, err = cli("validate", str(path), "train.momentum=0.5")
    assert code == 2
    assert err.strip() == (
        f"error: {path}: train.momentum acts only with train.optimizer: sgd; remove it or set train.optimizer: sgd."
    )


@pytest.mark.parametrize("task", sorted(BASES))
def test_a_runs_saved_config_is_a_valid_recipe(task, tmp_path):
    """A run's config.yaml writes every key, inert ones at their defaults: fed back as a recipe, it is accepted."""
    import yaml

    from visiontune.recipe import dump_config

    dump_config(parse_config(recipe(task, {})), tmp_path / "config.yaml")
    parse_config(yaml.safe_load((tmp_path / "config.yaml").read_text()))


def test_a_key_written_with_its_default_is_left_out():
    parse_config(
        recipe("classify", {"train.momentum": 0.9, "data.augment": {"preset": "none", "policy": "randaugment"}})
    )
