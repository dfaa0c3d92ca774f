"""Every key of every task's recipe schema acts ("a key either acts or is refused").

The schemas are walked at collection time (`visiontune.registry.TASKS`), so a key added to a schema gets a test
case here without anyone writing it, and a key that reaches nothing fails CI, named `task:key`.

How a case works: a per-task base recipe on tiny offline fixtures, plus the key's CONTEXT (settings under which
the key matters, e.g. `tune.method: lora` for `tune.lora.r`), is run through the real task code up to a LEVEL and
digested into a fingerprint; then the one key is changed to another valid value (ALT, or derived from its type
and constraints) and the fingerprint must differ. Most keys use the `build` level: `task.prepare` + `task.build`
+ the runner's `make_trainer` (no training), digesting the TrainingArguments, optimiser groups, callbacks,
trainer attributes, datasets (sizes, first collated batch), model (parameters, values, modules, LoRA settings),
collator, task data, W&B environment and the files written (tokenisation cache). Keys whose effect shows later
have a LEVEL that runs further with the real code: `evaluate` (evaluation before and during training), `save`
(exports, WiSE-FT), `entry` (`Task.train` with the training run stubbed: skip_training), `resume` (where
`train.resume` resumes from), `epochs` (callbacks stepped through epochs: gradual unfreezing), `step` (one
mid-training loss computation: scheduled sampling), `kwargs` (what reaches TrainingArguments where it cannot be
built here: DeepSpeed, FSDP). A key shown elsewhere can point to an existing test (POINTERS; checked to exist).
Before the key is changed the base recipe is written out in full, and a variant must differ from it in that key
only (validators and section defaults must not move other keys). Written out in full, a recipe also writes keys
that are inert under its other settings (`train.momentum` with AdamW), which validation refuses (run/config.py:
Inert); those are left out again, of the base and of each variant, and a key left out of a variant does not count
as a change (it acts on nothing there). A key whose own variant leaves it inert needs a CONTEXT. INERT_UNDER is
the other side: settings under which a written key is refused, each checked to be right (validated without the
refusal, two values of the key must leave the fingerprint alike).

A recipe section carried whole by an object (e.g. `GenerationEval.cfg`) does not count as an effect: pydantic
models are opaque to the fingerprint, so each of their keys must show its own consequence.

Keys found not to act are KNOWN_IGNORED: `xfail(strict=True)`, so the case flips when the key is made to act or
removed from the schema. ALSO_UNDER holds keys that act in their CONTEXT but must act under other settings too.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import enum
import functools
import hashlib
import json
import os
import random
import shutil
import types
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, ValidationError

from visiontune.recipe import parse_config
from visiontune.registry import TASKS
from visiontune.run.config import INERT_ERROR, RECIPE_CONTEXT
from visiontune.testing.segment_fixtures import PALETTE, PALETTE_IGNORE

CONFIGS = {name: spec.config_class() for name, spec in TASKS.items()}  # every task's schema

REPO = Path(__file__).resolve().parents[1]
SEGMENT_PALETTE = {**PALETTE, "ignore": PALETTE_IGNORE}  # the colours of the generated palette masks
COLOURS = ("red", "green", "blue")  # fixture image class c is tinted with channel c; words the tokenizers know


# --------------------------------------------------------------------------------------------- schema walk


def _members(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def _section(annotation: Any) -> type[BaseModel] | None:
    return next((m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)), None)


def _list_section(annotation: Any) -> type[BaseModel] | None:
    for m in _members(annotation):
        if get_origin(m) is list:
            return _section(get_args(m)[0])
    return None


def leaf_keys(schema: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted keys of a schema: `train.lr`, `data.augment.mixup`; an optional section is a key itself (turning it
    on) and so is each key inside it; `tasks[].name` is a key of the items of a list of sections."""
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        if key == "task":  # the discriminator: it picks the schema, it is not a setting of it
            continue
        section, items = _section(field.annotation), _list_section(field.annotation)
        if section is not None:
            if type(None) in _members(field.annotation):
                yield key
            yield from leaf_keys(section, f"{key}.")
        elif items is not None:
            yield from leaf_keys(items, f"{key}[].")
        else:
            yield key


def field_of(schema: type[BaseModel], key: str) -> Any:
    model: Any = schema
    *parents, leaf = key.replace("[]", "").split(".")
    for part in parents:
        annotation = model.model_fields[part].annotation
        model = _section(annotation) or _list_section(annotation)
    return model.model_fields[leaf]


def all_cases() -> list[tuple[str, str]]:
    return [(task, key) for task, schema in CONFIGS.items() for key in leaf_keys(schema)]


# ------------------------------------------------------------------------------------------- raw recipes


def set_key(raw: dict, key: str, value: Any) -> None:
    """Set a dotted key in a raw recipe; `a[].b` sets `b` of the first item of list `a`."""
    node: Any = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if part.endswith("[]"):
            node = node[part[:-2]][0]
        else:
            node = node.setdefault(part, {})
            if node is None:
                raise AssertionError(f"{key}: section {part} is off in this recipe; turn it on in CONTEXT")
    node[leaf.removesuffix("[]")] = value


def get_value(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part.removesuffix("[]"))
        if part.endswith("[]"):
            node = node[0]
    return node


def _resolve(value: Any, w: World) -> Any:
    return value(w) if callable(value) else copy.deepcopy(value)


def lookup(table: dict[str, Any], task: str, key: str) -> Any:
    """`task:key`, then `key`, then the nearest `section.*` (task-specific first)."""
    parts = key.split(".")
    wild = [".".join(parts[:i]) + ".*" for i in range(len(parts) - 1, 0, -1)]
    for name in (f"{task}:{key}", key, *(n for w in wild for n in (f"{task}:{w}", w))):
        if name in table:
            return table[name]
    return None


# ---------------------------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class World:
    """Tiny models and data for every task, built once per session."""

    root: Path
    fx: Path  # conftest's fixtures_dir: timm-vit, timm-cnn, hf-vit, clip, siglip, images
    paths: dict[str, Path]

    def __getitem__(self, name: str) -> str:
        return str(self.paths[name])


def _perturbed_copy(src: Path, dst: Path) -> Path:
    """The same model folder with its weights shifted: another model of the same shape."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for file in dst.rglob("*.safetensors"):
        state = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
        save_file(state, str(file), metadata={"format": "pt"})
    return dst


def _transformed_images(src: Path, dst: Path, op: Callable) -> Path:
    from PIL import Image

    for file in sorted(src.rglob("*.png")):
        target = dst / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        op(Image.open(file).convert("RGB")).save(target)
    return dst


def _subset(src: Path, dst: Path, per_class: int, skip: int = 0) -> Path:
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / folder.name).mkdir(parents=True)
        for file in sorted(folder.glob("*.png"))[skip : skip + per_class]:
            shutil.copy(file, dst / folder.name / file.name)
    return dst


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _conversations(images: list[str]) -> list[dict]:
    records = []
    for image in images:
        colour = COLOURS[int(Path(image).parent.name[-1])]
        question = {"role": "user", "content": "<image>What colour is this image?"}
        records.append({"messages": [question, {"role": "assistant", "content": colour}], "images": [image]})
    return records


def _pairs(images: list[str]) -> str:
    from visiontune.testing.fixtures import preference_pairs

    return "\n".join(json.dumps(pair) for pair in preference_pairs(_conversations(images))) + "\n"


@pytest.fixture(scope="session")
def world(fixtures_dir, tmp_path_factory) -> World:
    from PIL import ImageOps

    from visiontune.testing.detect_fixtures import write_detection_sets
    from visiontune.testing.segment_fixtures import write_segmentation_sets
    from visiontune.testing.vlm_fixtures import tiny_causal_lm, tiny_vlm

    root = tmp_path_factory.mktemp("keys-act")
    images = fixtures_dir / "images"
    p: dict[str, Path] = {}
    # Labelled images: another train set, a val set, one with an unreadable file, one with 64 x 64 images too.
    p["images2"] = _subset(images, root / "images2", per_class=8, skip=4)
    # The val set mirrored: an image also in the training set is a leak, refused before a run.
    val = _subset(images, root / "val_source", per_class=3)
    p["images_val"] = _transformed_images(val, root / "images_val", ImageOps.mirror)
    p["images_bad"] = _subset(images, root / "images_bad", per_class=8)
    p["images_mixed"] = _subset(images, root / "images_mixed", per_class=4)  # and a 64 x 64 image per class
    big = _transformed_images(p["images_val"], root / "big", lambda im: im.resize((64, 64)))
    for folder in sorted(big.iterdir()):
        shutil.copy(sorted(folder.glob("*.png"))[0], p["images_mixed"] / folder.name / "big.png")
    _write(p["images_bad"] / "class_0" / "broken.png", "not a png")
    # Relative paths resolve against the data file's folder (`data`) or `image_root` (`data_alt`: mirrored images).
    data = root / "data"
    p["data_alt"] = _transformed_images(images, root / "data_alt" / "images", ImageOps.mirror).parent
    shutil.copytree(images, data / "images")
    shutil.copytree(big, data / "big")
    files = sorted(str(f.relative_to(data)) for f in (data / "images").rglob("*.png"))
    # A CSV with two image and two label columns (data.image_column / data.label_column pick the second ones).
    rows = ["image,label,other_image,other_label"] + [
        f"{f},{Path(f).parent.name},{files[-1 - i]},{Path(files[(i + 5) % len(files)]).parent.name}"
        for i, f in enumerate(files)
    ]
    p["labels_csv"] = _write(data / "labels.csv", "\n".join(rows) + "\n")
    # Captions (clip_contrastive, vlm_assemble align).
    caption = "{},a {} image with stripes"
    captions = ["image,caption"] + [caption.format(f, COLOURS[int(Path(f).parent.name[-1])]) for f in files]
    p["captions"] = _write(data / "captions.csv", "\n".join(captions) + "\n")
    p["captions2"] = _write(data / "captions2.csv", "\n".join(captions[:1] + captions[1::2]) + "\n")
    p["captions_val"] = _write(data / "captions_val.csv", "\n".join(captions[:1] + captions[2::6]) + "\n")
    big_captions = [caption.format(f"big/class_{c}/000.png", COLOURS[c]) for c in range(3)]
    p["captions_mixed"] = _write(data / "captions_mixed.csv", "\n".join(captions[:13] + big_captions) + "\n")
    p["captions_bad"] = _write(
        data / "captions_bad.csv", "\n".join([*captions, "images/class_0/missing.png,a red image"])
    )
    # Conversations (vlm_sft, vlm_assemble instruct): 9 train records, 3 val, a LLaMA-Factory registry.
    picked = files[::4]
    p["convs"] = _write(data / "convs.json", json.dumps(_conversations(picked)))
    p["convs2"] = _write(data / "convs2.json", json.dumps(_conversations(files[1::4])))
    p["convs_val"] = _write(data / "convs_val.json", json.dumps(_conversations(files[2::12])))
    p["convs_bad"] = _write(
        data / "convs_bad.json", json.dumps(_conversations([*picked, "images/class_0/missing.png"]))
    )
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    registry = {
        name: {"file_name": f, **entry, "tags": tags} for name, f in (("a", "convs.json"), ("b", "convs2.json"))
    }
    p["registry"] = _write(data / "dataset_info.json", json.dumps(registry))
    # Preference pairs (vlm_preference): TRL prompt/chosen/rejected over the same images, a ranking registry.
    for name, chosen in (("pairs", picked), ("pairs2", files[1::4]), ("pairs_val", files[2::12])):
        p[name] = _write(data / f"{name}.jsonl", _pairs(chosen))
    p["pairs_bad"] = _write(data / "pairs_bad.jsonl", _pairs([*picked, "images/class_0/missing.png"]))
    ranking = {"formatting": "sharegpt", "ranking": True, "tags": tags}
    columns = {"messages": "prompt", "chosen": "chosen", "rejected": "rejected", "images": "images"}
    p["pairs_registry"] = _write(
        data / "pairs_info.json",
        json.dumps(
            {
                n: {"file_name": f"{f}.jsonl", **ranking, "columns": columns}
                for n, f in (("a", "pairs"), ("b", "pairs2"))
            }
        ),
    )
    # Models: a second one of each kind (same shapes, shifted weights), the VLM parts, a vision state dict, an
    # assembled model as an align run would leave it.
    p["timm-vit2"] = _perturbed_copy(fixtures_dir / "timm-vit", root / "timm-vit2")
    p["clip2"] = _perturbed_copy(fixtures_dir / "clip", root / "clip2")
    p["vlm"] = tiny_vlm("qwen2_vl", root / "vlm")
    p["vlm2"] = _perturbed_copy(p["vlm"], root / "vlm2")
    p["lm"] = tiny_causal_lm("qwen2", root / "lm")
    p["lm2"] = _perturbed_copy(p["lm"], root / "lm2")
    p["clip_state"] = _vision_state(fixtures_dir / "clip", root / "clip_vision.safetensors")
    p["align_run"] = _align_run(fixtures_dir / "clip", p["lm"], root / "align_run")
    p["exports"] = root / "exports"
    # Box-labelled images (detect): COCO train/val, the same set as YOLO, one with an annotation off its image.
    p.update({f"boxes-{k}": v for k, v in write_detection_sets(root / "boxes").items()})
    coco = json.loads(p["boxes-coco-train"].read_text())
    coco["annotations"].append({**coco["annotations"][0], "id": 999, "bbox": [500, 500, 10, 10]})
    p["boxes-bad"] = _write(p["boxes-coco-train"].with_name("bad.json"), json.dumps(coco))
    p["timm-cnn2"] = _perturbed_copy(fixtures_dir / "timm-cnn", root / "timm-cnn2")
    # Mask-labelled images (segment): the set as label ids, palette colours, VOC, COCO; one with an unknown label id.
    p.update({f"masks-{k}": v for k, v in write_segmentation_sets(root / "masks").items()})
    p["masks-bad"] = _unknown_label(p["masks-ids"], root / "masks-bad")
    return World(root, fixtures_dir, p)


def _unknown_label(src: Path, dst: Path) -> Path:
    """A copy of a label-id mask folder whose first training mask holds an id with no class."""
    import numpy as np
    from PIL import Image

    shutil.copytree(src, dst)
    mask = sorted((dst / "masks" / "train").glob("*.png"))[0]
    Image.fromarray(np.full_like(np.asarray(Image.open(mask)), 9)).save(mask)
    return dst


def _vision_state(model: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    from visiontune.clip.dual_encoder import resolve_dual_encoder

    state = resolve_dual_encoder(str(model)).model.state_dict()
    save_file({k: v + 0.01 for k, v in state.items() if k.startswith("vision_model.")}, str(out))
    return out


def _align_run(vision: Path, language: Path, out: Path) -> Path:
    from visiontune.vlm.assembled import build_assembled

    model, processor = build_assembled(str(vision), str(language), {"kind": "mlp2x_gelu", "options": {}}, seed=7)
    model.meta["stage"] = "align"
    model.save_pretrained(out / "model", processor)
    return out


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


CHAT_TEMPLATE = (  # a plain ChatML template: a different one from the fixtures' own
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def base_recipe(task: str, w: World) -> dict:
    """The task's recipe on the tiny fixtures (few images, tiny models), as the task's own tests build them."""
    out = str(w.root / "runs" / task)
    image_data = {"train": str(w.fx / "images"), "val_split": 0.25, "augment": {"preset": "none"}, "workers": 0}
    small_train = {"epochs": 1, "batch_size": 4, "logging_steps": 1}
    clip_data = {**image_data, "prompt_names": list(COLOURS), "templates": ["a photo of a {}", "a {} image"]}
    vlm_eval = {"max_new_tokens": 2, "max_samples": 2, "samples_during_training": 2}
    recipes: dict[str, dict] = {
        "classify": {"model": str(w.fx / "timm-vit"), "data": image_data, "train": small_train},
        "clip_classify": {"model": str(w.fx / "clip"), "data": clip_data, "train": small_train},
        "clip_continual": {
            "model": str(w.fx / "clip"),
            "tasks": [
                {"name": "first", "train": str(w.fx / "images")},
                {"name": "second", "train": w["images2"]},
            ],
            "data": {"templates": ["a photo of a {}"], "val_split": 0.25, "workers": 0},
            "train": small_train,
        },
        "clip_contrastive": {
            "model": str(w.fx / "clip"),
            "data": {"train": w["captions"], "val_split": 0.2, "workers": 0},
            "train": {**small_train, "batch_size": 8},
        },
        "vlm_sft": {
            "model": w["vlm"],
            "data": {"train": w["convs"], "val_split": 0.25, "max_length": 256},
            "train": small_train,
            "eval": vlm_eval,
        },
        "vlm_preference": {
            "model": w["vlm"],
            "data": {"train": w["pairs"], "val_split": 0.25, "max_length": 256},
            "train": small_train,
            "eval": vlm_eval,
        },
        "vlm_assemble": {
            "stage": "align",
            "vision": str(w.fx / "clip"),
            "language": w["lm"],
            "data": {"train": w["captions"], "val_split": 0.2, "limit": 16},
            "train": small_train,
            "eval": vlm_eval,
        },
        "detect": {
            "model": f"timm:local-dir:{w.fx / 'timm-cnn'}",
            "data": {**image_data, "train": w["boxes-coco-train"], "image_size": 64},
            "train": small_train,
        },
        "segment": {
            "model": f"timm:local-dir:{w.fx / 'timm-cnn'}",
            "data": {**image_data, "train": w["masks-ids"], "image_size": 32},
            "train": small_train,
        },
    }
    return {"task": task, "output_dir": out, **copy.deepcopy(recipes[task])}


# ------------------------------------------------------------------------------------------------ tables

# Another valid value where the type alone does not give one (paths, names, optional numbers), or where the
# derived one would not bite on the fixtures. Callables take the World.
ALT: dict[str, Any] = {
    "model": lambda w: w["timm-vit2"],
    "clip_classify:model": lambda w: w["clip2"],
    "clip_continual:model": lambda w: w["clip2"],
    "clip_contrastive:model": lambda w: w["clip2"],
    "vlm_sft:model": lambda w: w["vlm2"],
    "vlm_preference:model": lambda w: w["vlm2"],
    "output_dir": lambda w: str(w.root / "runs" / "elsewhere"),
    "seed": 7,
    "train.global_batch_size": 16,  # a multiple of every base recipe's batch (4, 8): sets grad_accum
    "chat_template": CHAT_TEMPLATE,
    "init_from": lambda w: w["clip_state"],
    "vlm_assemble:init_from": lambda w: w["align_run"],
    "vision": lambda w: w["clip2"],
    "language": lambda w: w["lm2"],
    "export_state_to": lambda w: str(w.paths["exports"] / "vision.safetensors"),
    "wise_ft": {},
    "wise_ft.alphas": [0.0, 1.0],
    "wise_ft.control": lambda w: w["images_val"],
    "wise_ft.choose": 0.3,
    "scheduled_sampling": {},
    "scheduled_sampling.k": 2.0,
    "projector.options": {"hidden": 8},
    "vision_layer": -2,
    "image_size": 64,
    # data
    "data.train": lambda w: w["images2"],
    "clip_contrastive:data.train": lambda w: w["captions2"],
    "vlm_sft:data.train": lambda w: w["convs2"],
    "vlm_preference:data.train": lambda w: w["pairs2"],
    "vlm_assemble:data.train": lambda w: w["captions2"],
    "data.val": lambda w: w["images_val"],
    "clip_contrastive:data.val": lambda w: w["captions_val"],
    "vlm_sft:data.val": lambda w: w["convs_val"],
    "vlm_preference:data.val": lambda w: w["pairs_val"],
    "vlm_assemble:data.val": lambda w: w["captions_val"],
    "data.val_split": 0.5,
    "data.image_size": 48,
    "data.workers": 1,
    "data.max_image_pixels": 2000,  # between the 32 x 32 and the 64 x 64 images (refused as too big)
    "vlm_sft:data.max_image_pixels": 600,  # below the 32 x 32 images (downscaled)
    "vlm_preference:data.max_image_pixels": 600,
    "vlm_assemble:data.max_image_pixels": 600,
    "data.image_column": "other_image",
    "data.label_column": "other_label",
    "data.class_names": ["class_2", "class_1", "class_0"],
    "data.templates": ["a picture of a {}"],
    "data.prompt_names": ["blue", "green", "red"],
    "data.augment.hflip": 0.0,
    "data.augment.mixup": 0.2,
    "data.augment.cutmix": 1.0,
    "data.image_root": lambda w: w["data_alt"],
    "data.dataset_name": "b",
    "vlm_sft:data.max_length": 53,  # the records have 55-56 tokens, 4-5 of them trained
    "vlm_preference:data.max_length": 53,  # cuts answers: such a pair is refused (a preference needs whole answers)
    "vlm_assemble:data.max_length": 70,  # 75-77 tokens, 10-12 trained
    "data.limit": 8,
    "data.prompt": "Caption this.",
    "data.zero_shot": lambda w: w["images_val"],
    "data.zero_shot_class_names": ["blue", "green", "red"],
    "tasks[].name": "renamed",
    "tasks[].train": lambda w: w["images_val"],
    "tasks[].val": lambda w: w["images_val"],
    "tasks[].class_names": ["class_2", "class_1", "class_0"],
    "tasks[].prompt_names": ["blue", "green", "red"],
    # tuning
    "tune.layer_decay": 0.75,
    "tune.lora.target_modules": ["fc1"],
    "clip_classify:tune.lora.target_modules": ["q_proj"],
    "clip_continual:tune.lora.target_modules": ["q_proj"],
    "tune.lora_target": ["q_proj"],
    "tune.unfreeze[].epoch": 1,
    "tune.unfreeze[].blocks": 0,
    # train / track / eval
    "train.max_steps": 5,
    "train.ema": {},
    "train.ema.decay": 0.9,
    "train.eval_steps": 5,
    "train.metric": "loss",
    "clip_contrastive:train.metric": "i2t_R@1",
    "vlm_sft:train.metric": "exact_match",
    "vlm_preference:train.metric": "rewards/accuracies",
    "vlm_preference:loss.rpo_alpha": 0.5,
    "vlm_assemble:train.metric": "exact_match",
    "train.early_stopping_patience": 2,
    "train.precision": "bf16",
    "tune.dtype": "bf16",  # auto loads the fixtures' saved fp32, as fp32 does
    "tune.qlora_bits": 8,
    "train.cpu": lambda w: _has_gpu(),  # the opposite of what the unset key picks on this machine
    "train.deepspeed": "zero2",
    "track.wandb_project": "elsewhere",
    "track.wandb_mode": "disabled",
    "eval.metrics": ["exact_match", "anls"],
    "eval.max_samples": 1,
    "eval.samples_during_training": 1,  # the vlm_sft fixture has 2 val records
    # detect
    "detect:model": lambda w: f"timm:local-dir:{w['timm-cnn2']}",
    "detect:data.train": lambda w: w["boxes-yolo"],
    "detect:data.val": lambda w: w["boxes-coco-val"],
    "detect:data.class_names": ["red", "green", "blue"],
    "detect:data.max_image_pixels": 4000,  # between the 60 x 60 and the 80 x 60 images (refused as too big)
    "detect:train.metric": "map_50",
    "detect:eval.conf": 0.5,
    "detect:eval.iou": 0.3,
    "detect:eval.max_detections": 2,
    # segment
    "segment:model": lambda w: f"timm:local-dir:{w['timm-cnn2']}",
    "segment:data.train": lambda w: w["masks-voc"],  # the same images, other files
    "segment:data.val": lambda w: w["masks-ids"],  # its val split
    "segment:data.class_names": ["background", "red", "green", "blue"],
    "segment:data.palette": {**SEGMENT_PALETTE, "blue": [0, 128, 0], "green": [0, 0, 128]},  # blue and green swapped
    "segment:data.max_image_pixels": 4000,  # between the 60 x 60 and the 80 x 60 images (refused as too big)
    "segment:train.metric": "mean_dice",
    "segment:eval.stride": 0.5,
    "segment:tune.lora.target_modules": ["key"],
}

# Settings under which a key matters, applied to both sides of the comparison.
CONTEXT: dict[str, Any] = {
    "segment:data.palette": {"data.train": lambda w: w["masks-palette"], "data.palette": SEGMENT_PALETTE},
    "segment:data.on_bad_sample": {"data.train": lambda w: w["masks-bad"]},
    "segment:data.max_image_pixels": {"data.on_bad_sample": "skip"},
    "segment:tune.lora.*": {"tune.method": "lora", "model": lambda w: str(w.fx / "segformer")},
    "segment:eval.stride": {"eval.mode": "slide"},
    "data.augment.hflip": {"data.augment.preset": "light"},
    "data.augment.policy": {"data.augment.preset": "strong"},
    "pretrained": {"model": lambda w: f"timm:local-dir:{w.fx / 'timm-vit'}"},  # a folder loads its own weights
    "data.on_bad_sample": {"data.train": lambda w: w["images_bad"]},
    "data.max_image_pixels": {"data.train": lambda w: w["images_mixed"], "data.on_bad_sample": "skip"},
    "clip_continual:data.max_image_pixels": {
        "tasks[].train": lambda w: w["images_mixed"],
        "data.on_bad_sample": "skip",
    },
    "clip_contrastive:data.max_image_pixels": {
        "data.train": lambda w: w["captions_mixed"],
        "data.on_bad_sample": "skip",
    },
    "vlm_sft:data.max_image_pixels": {},  # the VLM tasks downscale big images instead of refusing them
    "vlm_preference:data.max_image_pixels": {},
    "vlm_preference:data.on_bad_sample": {"data.train": lambda w: w["pairs_bad"]},
    "vlm_preference:data.dataset_name": {"data.train": lambda w: w["pairs_registry"], "data.dataset_name": "a"},
    "vlm_preference:loss.label_smoothing": {"loss.type": "robust"},
    "vlm_preference:loss.simpo_gamma": {"loss.type": "simpo"},
    "vlm_assemble:data.max_image_pixels": {},
    "clip_continual:data.on_bad_sample": {"tasks[].train": lambda w: w["images_bad"]},
    "clip_contrastive:data.on_bad_sample": {"data.train": lambda w: w["captions_bad"]},
    "vlm_sft:data.on_bad_sample": {"data.train": lambda w: w["convs_bad"]},
    "vlm_assemble:data.on_bad_sample": {"data.train": lambda w: w["captions_bad"], "data.limit": None},
    "data.image_column": {"data.train": lambda w: w["labels_csv"]},
    "data.label_column": {"data.train": lambda w: w["labels_csv"]},
    "data.dataset_name": {"data.train": lambda w: w["registry"], "data.dataset_name": "a"},
    "vlm_assemble:data.dataset_name": {
        "stage": "instruct",
        "data.train": lambda w: w["registry"],
        "data.dataset_name": "a",
    },
    "data.zero_shot_class_names": {"data.zero_shot": lambda w: w["images_val"]},
    "clip_contrastive:data.templates": {"data.zero_shot": lambda w: w["images_val"]},
    "tune.lora.*": {"tune.method": "lora"},
    "tune.unfreeze[].*": {
        "tune.method": "gradual_unfreeze",
        "tune.unfreeze": [{"epoch": 0, "blocks": 1}, {"epoch": 2, "blocks": "all"}],
    },
    "tune.train_language": {"tune.method": "full"},
    "tune.qlora_bits": {"tune.method": "qlora"},
    "stage": {"data.train": lambda w: w["convs"]},  # conversations serve both stages
    "vlm_assemble:image_size": {"vision": lambda w: f"timm:local-dir:{w.fx / 'timm-cnn'}"},  # a ViT's size is fixed
    "vlm_assemble:tune.*": {"stage": "instruct", "data.train": lambda w: w["convs"]},
    "vlm_assemble:tune.vision_lr_scale": {
        "stage": "instruct",
        "data.train": lambda w: w["convs"],
        "tune.vision": "full",
    },
    "train.momentum": {"train.optimizer": "sgd"},
    "train.ema.*": {"train.ema": {}},
    "track.wandb_project": {"track.wandb": True},
    "track.wandb_mode": {"track.wandb": True},
    "wise_ft.*": {"wise_ft": {}},
    "scheduled_sampling.*": {"scheduled_sampling": {}},
    "vlm_assemble:init_from": {"stage": "instruct", "data.train": lambda w: w["convs"]},
    "detect:data.on_bad_sample": {"data.train": lambda w: w["boxes-bad"]},
    "detect:data.max_image_pixels": {"data.on_bad_sample": "skip"},
    "detect:tune.lora.*": {"tune.method": "lora", "model": lambda w: str(w.fx / "detr")},
    "detect:data.augment.mosaic": {"data.augment.preset": "light"},
    "detect:data.augment.mosaic_off_epochs": {"data.augment.preset": "light", "data.augment.mosaic": 0.5},
}

# Keys whose base side is refused by design (the variant is the one that goes through).
BASE_REFUSED: dict[str, str] = {"data.on_bad_sample": "a bad sample with on_bad_sample=error stops the run"}

# How far a key's recipe runs before the fingerprint (default: build).
LEVEL: dict[str, str] = {
    "eval.*": "evaluate",
    # The detector's post-processing is set when the task builds it (Detector.configure): shown there, in its settings,
    # not by which boxes a random detector keeps.
    "detect:eval.*": "build",
    "data.zero_shot": "evaluate",
    "data.zero_shot_class_names": "evaluate",
    "clip_contrastive:data.templates": "evaluate",
    "export_state_to": "save",
    "wise_ft": "save",
    "wise_ft.*": "save",
    "skip_training": "entry",
    "train.resume": "resume",
    "train.deepspeed": "kwargs",
    "tune.unfreeze[].*": "epochs",
    "scheduled_sampling": "step",
    "scheduled_sampling.*": "step",
    "vlm_preference:loss.*": "step",  # what reaches the loss function (a spy), and the loss
}

# Keys whose effect is proven by an existing test rather than here: "tests/FILE.py::test_name".
POINTERS: dict[str, str] = {
    # refused on a machine that trains on CPU; a spy on transformers' save_on_cpu shows it acting where a GPU would
    "train.grad_checkpointing_offload": "tests/vlm/test_grad_offload.py::test_offload_reaches_the_checkpointed_blocks",
    # one CPU process refuses it (nothing to shard); the arguments it gives (two ranks: tests/run/test_fsdp_ranks.py)
    "train.fsdp": "tests/run/test_sharding_config.py::test_fsdp_reaches_training_arguments_as_fsdp2",
    # one process trains no DeepSpeed on CPU; two ranks train clip_continual under ZeRO-2 there (ZeRO-3 is refused)
    "clip_continual:train.deepspeed": "tests/clip/test_continual_deepspeed.py::"
    "test_clip_continual_trains_under_deepspeed",
    # takes the place of `model` (an assembled VLM instead of a transformers one), so no single-key variant exists
    "vlm_preference:init_from": "tests/vlm/test_preference_assembled.py::"
    "test_two_steps_move_adapters_and_projector_and_the_reference_stays_the_frozen_start",
}

# Keys that reach nothing (bugs): each case is xfail(strict=True), so it flips once the key acts or is removed.
KNOWN_IGNORED: dict[str, str] = {}

# Keys that act in their CONTEXT but must act under other settings too: (task, key, context, known-bug reason).
ALSO_UNDER: list[tuple[str, str, dict[str, Any], str | None]] = []


def _both_tasks_val(w: World) -> list[dict]:
    return [
        {"name": "first", "train": str(w.fx / "images"), "val": w["images_val"]},
        {"name": "second", "train": w["images2"], "val": w["images_val"]},
    ]


_INSTRUCT = {"stage": "instruct", "data.train": lambda w: w["convs"]}

# The other side of CONTEXT: settings under which validation refuses a written key as inert (run/config.py:Inert).
# Each case checks the refusal is right: validated without the refusal, two values of the key run alike at LEVEL.
# (task, key, setting, two values of the key, level)
INERT_UNDER: list[tuple[str, str, dict[str, Any], Any, Any, str]] = [
    ("classify", "train.momentum", {"train.optimizer": "adamw"}, 0.5, 0.9, "build"),
    ("classify", "tune.lora.r", {"tune.method": "full"}, 2, 8, "build"),
    ("classify", "tune.layer_decay", {"tune.method": "lora"}, 0.5, 0.9, "build"),
    ("classify", "tune.layer_decay", {"tune.method": "linear_probe"}, 0.5, 0.9, "build"),
    (
        "classify",
        "tune.unfreeze",
        {"tune.method": "full"},
        [{"epoch": 0, "blocks": 0}],
        [{"epoch": 1, "blocks": 1}],
        "epochs",
    ),
    ("classify", "data.augment.hflip", {"data.augment.preset": "none"}, 0.0, 1.0, "build"),
    ("classify", "data.augment.policy", {"data.augment.preset": "light"}, "randaugment", "trivialaugment", "build"),
    ("classify", "pretrained", {}, True, False, "build"),  # the base model is a folder
    ("classify", "data.val_split", {"data.val": lambda w: w["images_val"]}, 0.25, 0.5, "build"),
    ("classify", "track.wandb_project", {"track.wandb": False}, "a", "b", "build"),
    ("classify", "track.wandb_mode", {"track.wandb": False}, "online", "disabled", "build"),
    ("clip_classify", "tune.lora.r", {"tune.method": "full"}, 2, 8, "build"),
    ("clip_classify", "tune.lora.dropout", {"tune.method": "l_lora"}, 0.0, 0.3, "build"),
    (
        "clip_classify",
        "export_state_to",
        {"skip_training": True},
        lambda w: str(w.paths["exports"] / "a.safetensors"),
        lambda w: str(w.paths["exports"] / "b.safetensors"),
        "entry",
    ),
    ("clip_continual", "data.val_split", {"tasks": _both_tasks_val}, 0.25, 0.5, "build"),
    ("clip_contrastive", "data.zero_shot_class_names", {}, ["a", "b", "c"], ["blue", "green", "red"], "evaluate"),
    ("clip_contrastive", "data.templates", {}, ["a photo of a {}"], ["a {} picture"], "evaluate"),
    ("vlm_sft", "tune.lora_r", {"tune.method": "full"}, 4, 8, "build"),
    ("vlm_sft", "eval.max_new_tokens", {"data.val_split": 0}, 1, 3, "evaluate"),
    ("vlm_sft", "train.early_stopping_patience", {"data.val_split": 0}, 1, 3, "build"),
    ("vlm_preference", "loss.label_smoothing", {"loss.type": "sigmoid"}, 0.1, 0.3, "step"),
    ("vlm_preference", "loss.simpo_gamma", {"loss.type": "ipo"}, 0.1, 0.9, "step"),
    ("vlm_preference", "tune.lora_r", {"tune.method": "full"}, 4, 8, "build"),
    ("vlm_assemble", "tune.lora_r", {"stage": "align"}, 4, 8, "build"),
    ("vlm_assemble", "tune.train_projector", {"stage": "align"}, True, False, "build"),
    ("vlm_assemble", "init_from", {"stage": "align"}, lambda w: w["align_run"], "elsewhere", "build"),
    ("vlm_assemble", "tune.lora_r", {**_INSTRUCT, "tune.language": "full"}, 4, 8, "build"),
    ("vlm_assemble", "tune.vision_lr_scale", _INSTRUCT, 0.5, 2.0, "build"),
    ("vlm_assemble", "data.prompt", _INSTRUCT, "Describe it.", "Caption this.", "build"),
    ("vlm_assemble", "vision_layer", {**_INSTRUCT, "init_from": lambda w: w["align_run"]}, -1, -2, "build"),
    ("vlm_assemble", "scheduled_sampling.k", {"scheduled_sampling": {"schedule": "linear"}}, 2.0, 5.0, "step"),
    ("detect", "tune.freeze_backbone", {"tune.method": "linear_probe"}, True, False, "build"),
    ("detect", "fpn_channels", {"model": lambda w: str(w.fx / "detr")}, 32, 64, "build"),
    ("detect", "detector", {"model": lambda w: str(w.fx / "detr")}, "fcos", "retinanet", "build"),
    ("detect", "data.augment.hflip", {"data.augment.preset": "none"}, 0.0, 1.0, "build"),
    ("detect", "data.augment.mosaic", {"data.augment.preset": "none"}, 0.0, 1.0, "build"),
    ("detect", "data.augment.mosaic_off_epochs", {"data.augment.preset": "light"}, 0, 2, "build"),
    ("detect", "data.val_split", {"data.val": lambda w: w["boxes-coco-val"]}, 0.25, 0.5, "build"),
    ("segment", "decoder", {"model": lambda w: str(w.fx / "segformer")}, "fpn", "unet", "build"),
    ("segment", "decoder_channels", {"model": lambda w: str(w.fx / "segformer")}, 16, 32, "build"),
    ("segment", "decoder_refine", {"model": lambda w: str(w.fx / "segformer")}, 0, 8, "build"),
    ("segment", "decoder_refine", {"decoder": "unet"}, 0, 8, "build"),
    ("segment", "eval.stride", {"eval.mode": "resize"}, 0.5, 0.9, "evaluate"),
    (
        "segment",
        "data.reduce_labels",
        {"data.palette": SEGMENT_PALETTE, "data.train": lambda w: w["masks-palette"]},
        False,
        True,
        "build",
    ),
    ("segment", "data.val_split", {"data.val": lambda w: w["masks-ids"]}, 0.25, 0.5, "build"),
]


# ------------------------------------------------------------------------------------------- fingerprint


class _Stop(Exception):
    """Raised by a spy once it has seen what it came for."""


def _sha(data: bytes | str) -> str:
    return hashlib.sha1(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def _tensor(t: Any) -> list:
    import torch

    t = t.detach().cpu()
    raw = t.reshape(-1).contiguous()
    raw = raw.view(torch.uint8) if raw.numel() and raw.is_floating_point() or raw.dtype == torch.bool else raw
    return ["tensor", list(t.shape), str(t.dtype), _sha(raw.numpy().tobytes())]


def _primitives(obj: Any) -> dict[str, Any]:
    flat = (bool, int, float, str)
    return {
        k: v
        for k, v in sorted(vars(obj).items())
        if not k.startswith("_")
        and k != "training"
        and (isinstance(v, flat) or (isinstance(v, dict) and all(isinstance(x, flat) for x in v.values())))
    }


def describe(obj: Any, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """A JSON-able, deterministic account of what an object holds. Recipe sections (pydantic models) are opaque:
    an object that merely carries a section has not acted on its keys."""
    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return round(obj, 8)
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__name__}.{obj.name}"
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, BaseModel):
        return f"<recipe section {type(obj).__name__}>"
    if isinstance(obj, torch.Tensor):
        return _tensor(obj)
    if isinstance(obj, np.ndarray):
        return _tensor(torch.from_numpy(np.ascontiguousarray(obj)))
    if isinstance(obj, Image.Image):
        return ["image", obj.mode, list(obj.size), _sha(obj.tobytes())]
    if isinstance(obj, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)):
        return f"<function {getattr(obj, '__qualname__', type(obj).__name__)}>"
    if isinstance(obj, type):
        return f"<class {obj.__qualname__}>"
    if depth > 7 or id(obj) in seen:
        return f"<{type(obj).__qualname__}>"
    seen, depth = seen | {id(obj)}, depth + 1
    if isinstance(obj, dict):
        return {str(k): describe(v, depth, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth, seen) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((describe(v, depth, seen) for v in obj), key=repr)
    module = type(obj).__module__
    if module.startswith("torchvision"):
        return repr(obj)
    if module.startswith(("rich", "threading", "logging", "_io", "io")):
        return f"<{type(obj).__qualname__}>"
    if isinstance(obj, nn.Module):
        return {"module": type(obj).__qualname__, **_primitives(obj)}
    if module.startswith("transformers") and hasattr(obj, "to_dict") and hasattr(obj, "model_type"):
        return {"config": type(obj).__qualname__, **describe(obj.to_dict(), depth, seen)}
    if module.startswith("transformers") and hasattr(obj, "save_pretrained"):  # processors and tokenizers
        return {"processor": type(obj).__qualname__, "chat_template": getattr(obj, "chat_template", None)}
    if dataclasses.is_dataclass(obj):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if not f.name.startswith("_")}
        return {"type": type(obj).__qualname__, **_as_fields(describe(fields, depth, seen))}
    if hasattr(obj, "__dict__"):
        attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return {"type": type(obj).__qualname__, **_as_fields(describe(attrs, depth, seen))}
    return f"<{type(obj).__qualname__}>"


def _as_fields(described: Any) -> dict:
    """An object's fields as described; past the depth limit `describe` gives a placeholder string instead."""
    return described if isinstance(described, dict) else {"fields": described}


def model_digest(model: Any) -> dict:
    named = list(model.named_parameters()) + list(model.named_buffers())
    values = hashlib.sha1()
    for _, t in named:
        values.update(_tensor(t)[3].encode())
    return {
        "parameters": [[n, list(p.shape), str(p.dtype), p.requires_grad] for n, p in model.named_parameters()],
        "buffers": [[n, list(b.shape)] for n, b in model.named_buffers()],
        "values": values.hexdigest(),
        "modules": [[n, type(m).__qualname__, m.extra_repr(), _primitives(m)] for n, m in model.named_modules()],
        "attributes": describe({k: v for k, v in vars(model).items() if not k.startswith("_")}),
    }


def optimizer_digest(optimizer: Any, model: Any) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        {
            **describe({k: v for k, v in g.items() if k != "params"}),
            "params": sorted(names.get(id(p), "?") for p in g["params"]),
        }
        for g in optimizer.param_groups
    ]
    return {"type": type(optimizer).__qualname__, "groups": groups}


def dataset_digest(dataset: Any, collator: Any) -> Any:
    import torch

    if dataset is None:
        return None
    torch.manual_seed(0)
    random.seed(0)
    first = [dataset[i] for i in range(min(2, len(dataset)))]
    return {
        "type": type(dataset).__qualname__,
        "length": len(dataset),
        "state": describe({k: v for k, v in vars(dataset).items() if not k.startswith("_")}),
        "batch": describe(collator(first)) if first else None,
    }


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []


_TIMINGS = ("runtime", "per_second", "preparation_time", "wall_time_s", "epoch")


def _untimed(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not str(k).endswith(_TIMINGS)}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def run_digest(fit: Any, trainer: Any, task: Any = None, data: Any = None) -> dict:
    """What a key can change in one Trainer run about to start: a digest per component."""
    collator_state = describe(fit.collator)
    digest = {
        "arguments": describe(trainer.args.to_dict()),
        "trainer": {
            "class": type(trainer).__qualname__,
            "attrs": {name: describe(getattr(trainer, name)) for name in sorted(fit.trainer_attrs)},
            "ema": describe(getattr(trainer, "ema", None)),
            "has_eval": trainer.eval_dataset is not None,
        },
        "optimizer": optimizer_digest(trainer.optimizer or trainer.create_optimizer(), trainer.model),
        "callbacks": [describe(cb) for cb in trainer.callback_handler.callbacks],
        "model": model_digest(trainer.model),
        "collator": collator_state,
        "compute_metrics": describe(fit.compute_metrics),
        "fit": {"items": fit.items, "workers": fit.workers, "args": describe(fit.args)},
        "train_data": dataset_digest(fit.train_dataset, fit.collator),
        "eval_data": dataset_digest(fit.eval_dataset, fit.collator),
    }
    if task is not None:
        digest["task_data"] = {
            "sizes": task.sizes(data),
            "skipped": describe(task.skipped(data)),
            "data": describe(data),
        }
    return digest


def _hashed(fingerprint: dict) -> dict[str, str]:
    """Each component as a short hash (an error as its message, to be read in a failure)."""
    return {k: v if k == "error" else _sha(json.dumps(v, sort_keys=True, default=str)) for k, v in fingerprint.items()}


class Runner:
    """Fingerprints of recipes at a level, memoised (the base side of many comparisons is the same recipe)."""

    def __init__(self, world: World, monkeypatch_factory: Callable):
        self.world = world
        self.patch = monkeypatch_factory
        self.memo: dict[str, dict[str, str]] = {}

    def fingerprint(self, raw: dict, level: str = "build", memo: bool = True) -> dict[str, str]:
        key = level + json.dumps(raw, sort_keys=True, default=str)
        if memo and key in self.memo:
            return self.memo[key]
        result = _hashed(self.collect(raw, level))
        self.memo[key] = result
        return result

    def collect(self, raw: dict, level: str) -> dict[str, Any]:
        cfg = parse_config(copy.deepcopy(raw))
        with self.isolated(cfg) as mp:
            try:
                found = LEVELS[level](self, cfg, mp)
            except Exception as err:  # a refusal is an effect too (the base recipe must not be refused)
                message = str(err).splitlines()[0] if str(err) else ""
                found = {"error": f"{type(err).__name__}: {message}"}
            found["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("WANDB_")}
            found["cache"] = len(_files(Path(os.environ["VISIONTUNE_CACHE"])))  # its names hash the settings
            found["exports"] = _files(self.world.paths["exports"])
        return found

    def isolated(self, cfg: Any):
        import contextlib

        import numpy as np
        import torch

        @contextlib.contextmanager
        def scope():
            env = dict(os.environ)
            cache = self.world.root / "cache"
            for folder in (cache, Path(cfg.output_dir), self.world.paths["exports"]):
                shutil.rmtree(folder, ignore_errors=True)
            mp = self.patch()
            mp.setenv("VISIONTUNE_CACHE", str(cache))
            for name in ("WANDB_PROJECT", "WANDB_DIR"):
                mp.delenv(name, raising=False)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny models: one thread is several times faster on a shared machine
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            try:
                yield mp
            finally:
                torch.set_num_threads(threads)
                mp.undo()
                os.environ.clear()
                os.environ.update(env)

        return scope()


# ---------------------------------------------------------------------------------------------- levels


def _built(cfg: Any) -> tuple[Any, Any, Any, Any]:
    """task.prepare -> task.build -> make_trainer, as `run_task` does (the run folder exists before build)."""
    from visiontune.recipe import get_task
    from visiontune.run.runner import make_trainer

    task = get_task(cfg.task)
    run_dir = Path(cfg.output_dir)
    data = task.prepare(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    fit = task.build(cfg, data, run_dir)
    return task, data, fit, make_trainer(cfg, fit, run_dir)


def level_build(runner: Runner, cfg: Any, mp: Any) -> dict:
    if cfg.task == "clip_continual":
        return _continual(cfg, mp)
    task, data, fit, trainer = _built(cfg)
    return {**run_digest(fit, trainer, task, data), "run_dir": _files(Path(cfg.output_dir))}


def _continual(cfg: Any, mp: Any) -> dict:
    """clip_continual's stages (`run.stages.run_stages`) with each stage's training stubbed: every stage's Trainer
    is digested as it is made, the accuracy matrix (real evaluations) is kept."""
    import visiontune.clip.continual as continual
    import visiontune.run.stages as stages_module

    stages, result = [], {}
    make = stages_module.make_trainer

    def spy(stage_cfg, fit, stage_dir):
        trainer = make(stage_cfg, fit, stage_dir)
        stages.append(run_digest(fit, trainer))
        return trainer

    def accuracy(self, clf, data, index):  # what would be evaluated, without evaluating it
        split = data.splits[index]
        evaluated.append(
            describe(
                [data.names[index], [split.val.ref(i) for i in range(len(split.val))], model_digest(clf)["values"]]
            )
        )
        return 0.5

    evaluated: list = []
    mp.setattr(stages_module, "make_trainer", spy)
    mp.setattr(stages_module, "train_with_progress", lambda trainer, checkpoint: None)
    mp.setattr(continual, "_write_outputs", lambda run_dir, found: result.update(found))
    mp.setattr(continual.ClipContinualTask, "_accuracy", accuracy)
    continual.ClipContinualTask().train(cfg, overwrite=True)
    return {
        **{f"task{i}.{part}": digest for i, stage in enumerate(stages) for part, digest in stage.items()},
        "evaluated": evaluated,
        "result": _untimed(result),
        "run_dir": _files(Path(cfg.output_dir)),
    }


def level_evaluate(runner: Runner, cfg: Any, mp: Any) -> dict:
    """The task's evaluation before training and the validation during training, and what it asks of the model:
    the zero-shot heads it scores with and every `generate` call (arguments, input shapes). A random tiny model's
    scores and answers are no evidence: two heads can score the same accuracy, and 2 or 3 new tokens can decode to
    the same text, depending on float rounding (the CPU's kernels) and on what ran before."""
    import torch
    from transformers.generation.utils import GenerationMixin

    import visiontune.clip.contrastive as contrastive

    heads: list = []
    real = contrastive.zero_shot_head

    def head(*args, **kwargs):
        result = real(*args, **kwargs)
        heads.append(describe(result))
        return result

    generations: list = []
    real_generate = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        shown = {k: list(v.shape) if isinstance(v, torch.Tensor) else describe(v) for k, v in kwargs.items()}
        generations.append({"model": type(self).__qualname__, "args": len(args), **shown})
        return real_generate(self, *args, **kwargs)

    mp.setattr(contrastive, "zero_shot_head", head)
    mp.setattr(GenerationMixin, "generate", generate)
    task, data, fit, trainer = _built(cfg)
    before = task.evaluate_run(cfg, fit, trainer, data, "before")
    during = trainer.evaluate() if trainer.eval_dataset is not None else {}
    return {
        "before": describe(_untimed(before)),
        "during": describe(_untimed(during)),
        "heads": heads,
        "generations": generations,
    }


def level_save(runner: Runner, cfg: Any, mp: Any) -> dict:
    """The task's exports after a (here: untrained) run: what `save` writes, inside and outside the run folder."""
    task, data, fit, trainer = _built(cfg)
    run_dir = Path(cfg.output_dir)
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    after = task.evaluate_run(cfg, fit, trainer, data, "after")
    extras = task.save(cfg, fit, trainer, data, run_dir, after)
    jsons = {
        str(p.relative_to(run_dir)): _untimed(json.loads(p.read_text()))
        for p in sorted(run_dir.rglob("*.json"))
        if "checkpoint" not in str(p)
    }
    return {"extras": describe(_untimed(extras)), "files": _files(run_dir), "json": jsons}


def level_entry(runner: Runner, cfg: Any, mp: Any) -> dict:
    """`Task.train` with the runner's training run stubbed: which way the task goes, and what it writes."""
    import visiontune.run.runner as runner_module
    from visiontune.recipe import get_task

    def stub(*args, **kwargs):
        raise _Stop("run_task")

    mp.setattr(runner_module, "run_task", stub)
    try:
        get_task(cfg.task).train(cfg, overwrite=True)
        path = "own"
    except _Stop:
        path = "run_task"
    return {"path": path, "run_dir": _files(Path(cfg.output_dir))}


def level_resume(runner: Runner, cfg: Any, mp: Any) -> dict:
    """Where a run starts when its folder holds a finished checkpoint (and, for staged tasks, recorded progress)."""
    import visiontune.run.runner as runner_module
    import visiontune.run.stages as stages_module
    from visiontune.recipe import get_task
    from visiontune.run.folder import CHECKPOINTS

    run_dir = Path(cfg.output_dir)
    _write(run_dir / CHECKPOINTS / "checkpoint-1" / "trainer_state.json", json.dumps({"global_step": 1}))
    _write(run_dir / "stages" / "progress.json", json.dumps({"before": {}, "stages": []}))
    seen: dict[str, Any] = {}
    for module, name in ((runner_module, "resume_point"), (stages_module, "read_progress")):
        real = getattr(module, name)

        def spy(*args, real=real, **kwargs):
            seen["start"] = describe(real(*args, **kwargs))
            raise _Stop

        mp.setattr(module, name, spy)
    with pytest.raises(_Stop):
        get_task(cfg.task).train(cfg)
    return seen


def level_kwargs(runner: Runner, cfg: Any, mp: Any) -> dict:
    """What reaches TrainingArguments, for values it cannot be built with here (DeepSpeed without the package, FSDP
    outside a distributed launch)."""
    import visiontune.run.arguments as arguments

    seen: dict[str, Any] = {}
    real = arguments.TrainingArguments

    def record(**kwargs):
        seen.update(kwargs)
        return real(**{**kwargs, "deepspeed": None, "fsdp": ""})

    mp.setattr(arguments, "check_deepspeed", lambda train: None)
    mp.setattr(arguments, "deepspeed_on_cpu", lambda: {})  # the process group set-up: nothing to set up here
    mp.setattr(arguments, "TrainingArguments", record)
    if cfg.task == "clip_continual":
        _continual(cfg, mp)
    else:
        _built(cfg)
    return {"kwargs": describe(seen)}


def level_epochs(runner: Runner, cfg: Any, mp: Any) -> dict:
    """The callbacks stepped through epochs 0..3: which parameters train in each."""
    from transformers import TrainerControl, TrainerState

    task, data, fit, trainer = _built(cfg)
    trained = []
    for epoch in range(4):
        state = TrainerState(epoch=float(epoch))
        for callback in trainer.callback_handler.callbacks:
            callback.on_epoch_begin(trainer.args, state, TrainerControl(), model=trainer.model)
        trained.append(sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad))
    return {"trained": trained}


def level_step(runner: Runner, cfg: Any, mp: Any) -> dict:
    """One training loss computed at step 3 of 10, as the trainer computes it mid-run."""
    import torch

    import visiontune.vlm.assemble as assemble
    import visiontune.vlm.preference as preference

    seen: dict[str, Any] = {}
    real = assemble.teacher_forcing_ratio

    def spy(*args, **kwargs):
        seen["teacher_forcing"] = real(*args, **kwargs)
        return seen["teacher_forcing"]

    mp.setattr(assemble, "teacher_forcing_ratio", spy)
    real_loss = preference.preference_loss

    def loss_spy(*args, **kwargs):
        seen["preference_loss"] = kwargs
        return real_loss(*args, **kwargs)

    mp.setattr(preference, "preference_loss", loss_spy)
    task, data, fit, trainer = _built(cfg)
    batch = {k: v.to(trainer.args.device) for k, v in fit.collator([fit.train_dataset[i] for i in range(2)]).items()}
    trainer.state.global_step, trainer.state.max_steps = 3, 10
    trainer.model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return {"loss": round(float(loss), 5), **describe(seen)}


LEVELS: dict[str, Callable[[Runner, Any, Any], dict]] = {
    "build": level_build,
    "evaluate": level_evaluate,
    "save": level_save,
    "entry": level_entry,
    "resume": level_resume,
    "kwargs": level_kwargs,
    "epochs": level_epochs,
    "step": level_step,
}


# ------------------------------------------------------------------------------------------------- cases


def case_recipes(task: str, key: str, w: World) -> tuple[dict, list[dict]]:
    """The base recipe (with the key's context) written out in full, and variants with only the key changed."""
    raw = base_recipe(task, w)
    for k, v in (lookup(CONTEXT, task, key) or {}).items():
        set_key(raw, k, _resolve(v, w))
    cfg = parse_config(copy.deepcopy(raw))
    # Every key explicit, so that setting one key inside a section leaves the section's other keys as they were
    # (a section written in a recipe starts from its class defaults, not from the field's default instance).
    full = cfg.model_dump(mode="json")
    base, _ = without_inert(task, full)
    current = get_value(cfg, key)
    table = ALT.get(f"{task}:{key}", ALT.get(key))
    candidates = [_resolve(table, w)] if table is not None else derived_values(field_of(CONFIGS[task], key), current)
    variants = []
    scope = key.replace("[]", ".0")
    for value in candidates:
        variant = copy.deepcopy(full)
        set_key(variant, key, value)
        variant, dropped = without_inert(task, variant)
        if any(_within(scope, d) for d in dropped):  # the key itself acts on nothing in this variant
            continue
        try:
            dumped = parse_config(copy.deepcopy(variant)).model_dump(mode="json")
        except Exception:
            continue
        changed = {k for k, v in _flat(dumped).items() if _flat(full).get(k, "<absent>") != v}
        changed |= {k for k in _flat(full) if k not in _flat(dumped)}
        changed = {k for k in changed if not any(_within(k, d) for d in dropped)}
        if changed and all(_within(k, scope) for k in changed):
            variants.append(variant)
    return base, variants


def _within(key: str, scope: str) -> bool:
    return key == scope or key.startswith(scope + ".")


def without_inert(task: str, raw: dict) -> tuple[dict, list[str]]:
    """The recipe without the keys validation refuses as inert under its other settings (a section emptied so is
    left out too, on the next round), and those keys."""
    raw, dropped = copy.deepcopy(raw), []
    for _ in range(10):
        try:
            CONFIGS[task].model_validate(copy.deepcopy(raw), context=RECIPE_CONTEXT)
            break
        except ValidationError as err:
            keys = [k for e in err.errors() if e["type"] == INERT_ERROR for k in e["ctx"]["keys"]]
            if not keys:
                break  # refused for another reason: the caller sees it
            for k in keys:
                *parents, leaf = k.split(".")
                node = raw
                for part in parents:
                    node = node[part]
                del node[leaf]
            dropped += keys
    return raw, dropped


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(raw, dict) and raw:
        return {k: v for name, value in raw.items() for k, v in _flat(value, f"{prefix}{name}.").items()}
    if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        return {k: v for i, value in enumerate(raw) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): raw}


def derived_values(field: Any, current: Any) -> list[Any]:
    """Other values of a key's type near its current one; the schema's constraints filter them later."""
    values: list[Any] = []
    for member in _members(field.annotation):
        if member is bool and isinstance(current, bool):
            values.append(not current)
        elif get_origin(member) is Literal:
            values += [v for v in get_args(member) if v != current]
        elif member is int and isinstance(current, int) and not isinstance(current, bool):
            values += [current + 1, current - 1, current * 2]
        elif member is float and isinstance(current, (int, float)) and not isinstance(current, bool):
            values += [round(current / 2, 6), round(current * 2, 6) or 0.5, round(current + 0.1, 6), 0.5]
    return values


@pytest.fixture(scope="session")
def runner(world) -> Runner:
    return Runner(world, pytest.MonkeyPatch)


# Levels that run a tiny random model (evaluation, generation, a loss): their cases are `random_model` tests, which
# `make test-portable` runs on the CPU kernels without SIMD as well.
MODEL_LEVELS = ("evaluate", "save", "step")


def _model_mark(task: str, key: str) -> list[Any]:
    return [pytest.mark.random_model] if (lookup(LEVEL, task, key) or "build") in MODEL_LEVELS else []


def _params() -> list[Any]:
    params = []
    for task, key in all_cases():
        reason = KNOWN_IGNORED.get(f"{task}:{key}")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(task, key, id=f"{task}:{key}", marks=marks + _model_mark(task, key)))
    return params


@pytest.mark.parametrize(("task", "key"), _params())
def test_key_acts(task, key, world, runner):
    pointer = lookup(POINTERS, task, key)
    if pointer is not None:
        assert _test_exists(pointer), f"{task}:{key} points to {pointer}, which does not exist"
        return
    base, variants = case_recipes(task, key, world)
    assert variants, (
        f"{task}:{key} has no other valid value to try: give one in ALT (and a CONTEXT if it needs one), "
        "or a LEVEL / POINTERS entry that shows its effect"
    )
    level = lookup(LEVEL, task, key) or "build"
    before = runner.fingerprint(base, level)
    if lookup(BASE_REFUSED, task, key) is None:
        assert "error" not in before, f"{task}:{key}: the base recipe fails at level {level}: {before['error']}"
    after = runner.fingerprint(variants[0], level)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed, (
        f"{task}:{key} does not act: changing it ({_shown(base, variants[0], key)}) changes nothing at level "
        f"{level}. Make the key act, refuse it, or show its effect with a LEVEL or POINTERS entry."
    )


def _also_params() -> list[Any]:
    params = []
    for task, key, context, reason in ALSO_UNDER:
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        label = ",".join(f"{k}={v}" for k, v in context.items())
        params.append(
            pytest.param(task, key, context, id=f"{task}:{key}[{label}]", marks=marks + _model_mark(task, key))
        )
    return params


@pytest.mark.parametrize(("task", "key", "context"), _also_params())
def test_key_acts_under(task, key, context, world, runner, monkeypatch):
    monkeypatch.setitem(CONTEXT, f"{task}:{key}", context)
    test_key_acts(task, key, world, runner)


def _shown(base: dict, variant: dict, key: str) -> str:
    def value(raw: dict) -> Any:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict):
                return None
            node = node.get(part.removesuffix("[]"))
            if part.endswith("[]") and node:
                node = node[0]
        return node

    return f"{value(base)!r} -> {value(variant)!r}"


def _test_exists(pointer: str) -> bool:
    file, _, name = pointer.partition("::")
    path = REPO / file
    if not path.is_file():
        return False
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree))


@pytest.mark.parametrize(
    ("task", "key", "setting", "first", "second", "level"),
    [
        pytest.param(
            *c, id=f"{c[0]}:{c[1]}[{','.join(c[2])}]", marks=[pytest.mark.random_model] * (c[5] in MODEL_LEVELS)
        )
        for c in INERT_UNDER
    ],
)
def test_refused_key_is_inert(task, key, setting, first, second, level, world, runner, monkeypatch):
    """Validation refuses the key under `setting`, and rightly: with the refusal off, its value changes nothing."""
    import visiontune.recipe as recipe_module
    from visiontune.core.errors import RecipeError

    raw = base_recipe(task, world)
    for k, v in setting.items():
        set_key(raw, k, _resolve(v, world))
    recipes = []
    for value in (first, second):
        recipes.append(copy.deepcopy(raw))
        set_key(recipes[-1], key, _resolve(value, world))
    refusals = []  # a value equal to the key's default is not refused (leaving the key out means the same)
    for r in recipes:
        try:
            parse_config(copy.deepcopy(r))
        except RecipeError as err:
            refusals.append(str(err))
    assert any(key in e for e in refusals), f"{task}:{key} under {setting} is not refused: {refusals}"
    monkeypatch.setattr(recipe_module, "RECIPE_CONTEXT", {})  # validate as code does, not as a recipe
    before, after = (runner.fingerprint(r, level) for r in recipes)
    assert "error" not in before, f"{task}:{key} under {setting}: the recipe fails at level {level}: {before['error']}"
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{task}:{key} is refused under {setting} but acts there: it changes {changed} at {level}"


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_base_fingerprint_is_deterministic(task, world, runner):
    """Two builds of the same recipe digest alike, so a difference in `test_key_acts` comes from the key."""
    base = base_recipe(task, world)
    first = runner.fingerprint(base)
    assert "error" not in first, first
    assert runner.fingerprint(base, memo=False) == first


def test_tables_name_schema_keys():
    """Every table entry matches some task's key (a renamed key must not leave its entry behind silently)."""
    cases = all_cases()
    keys = {k for _, k in cases}
    known = {f"{t}:{k}" for t, k in cases} | keys
    sections = {".".join(k.split(".")[:i]) + ".*" for k in keys for i in range(1, k.count(".") + 1)}
    sections |= {f"{t}:{s}" for t in CONFIGS for s in sections}
    for name, table in (("ALT", ALT), ("CONTEXT", CONTEXT), ("LEVEL", LEVEL), ("POINTERS", POINTERS)):
        stale = [entry for entry in table if entry not in known | sections]
        assert not stale, f"{name} has entries for keys no schema has: {stale}"
