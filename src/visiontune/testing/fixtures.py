"""Tiny random-weight models and generated image sets, saved to local folders, so tests and smoke runs go through
the same loading path as real hub models — fully offline. `visiontune fixtures OUT_DIR` writes them all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TINY_VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_timm_vit(out: Path, num_classes: int = 3) -> Path:
    """timm ViT (2 blocks, width 32) in timm's `save_for_hf` format: loads with `timm:local-dir:OUT` or `OUT`."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_VIT_ARGS)
    save_for_hf(model, str(out), model_args=TINY_VIT_ARGS, safe_serialization=True)
    _patch_input_size(out / "config.json", TINY_VIT_ARGS["img_size"])
    return out


def tiny_timm_cnn(out: Path, num_classes: int = 3) -> Path:
    """timm's own `test_efficientnet` (100k params) saved locally."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes)
    save_for_hf(model, str(out), safe_serialization=True)
    _patch_input_size(out / "config.json", 32)
    return out


def tiny_hf_vit(out: Path, num_classes: int = 3) -> Path:
    """transformers ViTForImageClassification + ViTImageProcessor at 32 px, saved with `save_pretrained`."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_classes,
    )
    ViTForImageClassification(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def tiny_hf_detr(out: Path, num_classes: int = 3) -> Path:
    """transformers DetrForObjectDetection (a 4-stage ResNet of width 8-16, d_model 32, one encoder and one decoder
    layer, 10 queries) + its image processor at 64 px: the transformers detector kind of `task: detect`."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], out_features=["stage4"]
    )
    config = DetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        id2label={i: f"class_{i}" for i in range(num_classes)},
    )
    DetrForObjectDetection(config).save_pretrained(out)
    DetrImageProcessor(size={"max_height": 64, "max_width": 64}).save_pretrained(out)
    return out


def tiny_hf_segformer(out: Path, num_classes: int = 3) -> Path:
    """transformers SegformerForSemanticSegmentation (two encoder stages of width 8 and 16, 7k parameters) + its
    image processor at 32 px: the transformers model kind of `task: segment`."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        id2label={i: f"class_{i}" for i in range(num_classes)},
    )
    SegformerForSemanticSegmentation(config).save_pretrained(out)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def tiny_hf_mask2former(out: Path, num_classes: int = 3, image_size: int = 64) -> Path:
    """transformers Mask2FormerForUniversalSegmentation (a one-block-per-stage Swin of width 8, 6 queries, 115k
    parameters) + its image processor at `image_size`: the mask-query kind of `task: segment` (semantic mode).
    Widths of 32: the pixel decoder's GroupNorm takes 32 groups."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    swin = SwinConfig(
        image_size=image_size,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_queries=6,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_attention_heads=2,
        train_num_points=256,
        id2label={i: f"class_{i}" for i in range(num_classes)},
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(out)
    Mask2FormerImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """A learnable image-folder dataset: each class has its own colour and stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_sample(rng, c, size)).save(folder / f"{i:03d}.png")
    return root


def _sample(rng: np.random.Generator, c: int, size: int) -> np.ndarray:
    img = rng.integers(0, 60, (size, size, 3)).astype(np.int64)
    img[..., c % 3] += 150
    stripes = (np.arange(size) // 4) % 2 == 0
    if c % 2:
        img[stripes, :, :] += 40
    else:
        img[:, stripes, :] += 40
    return img.clip(0, 255).astype(np.uint8)


def _patch_input_size(config_file: Path, size: int) -> None:
    """Record the real input size in pretrained_cfg so preprocessing resolves to it."""
    config = json.loads(config_file.read_text())
    config.setdefault("pretrained_cfg", {})["input_size"] = [3, size, size]
    config_file.write_text(json.dumps(config, indent=2))


def write_all(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    return {
        "timm-vit": tiny_timm_vit(out / "timm-vit"),
        "timm-cnn": tiny_timm_cnn(out / "timm-cnn"),
        "hf-vit": tiny_hf_vit(out / "hf-vit"),
        "detr": tiny_hf_detr(out / "detr"),
        "segformer": tiny_hf_segformer(out / "segformer"),
        "clip": tiny_clip(out / "clip"),
        "siglip": tiny_siglip(out / "siglip"),
        "images": image_folder(out / "images"),
    }


_WORDS = (
    "a photo of the an image with picture small large bright dark handwritten digit number zero one two three four "
    "five six seven eight nine cat dog car bird red green blue stripes colour class this is"
).split()


def word_tokenizer(out: Path, max_length: int = 16):
    """A deterministic word-level fast tokenizer (pad=0, unk=1, bos=2, eos=3) — trained BPE for CLIP is not
    reproducible run to run, and the tiny dual encoders only need stable ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *sorted(set(_WORDS))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )
    tok.save_pretrained(out)
    return tok


def _tiny_text(tok: Any) -> dict[str, Any]:
    """The tiny text tower of both dual encoders (width 32, 2 layers) over `word_tokenizer`'s ids."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }


def tiny_clip(out: Path) -> Path:
    """transformers CLIPModel (32 px, width 32, projection 16) + tokenizer + image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from visiontune.testing.vlm_fixtures import TINY_VISION

    text = _tiny_text(word_tokenizer(out))
    CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16)).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def tiny_siglip(out: Path) -> Path:
    """transformers SiglipModel (32 px, width 32) + tokenizer + image processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from visiontune.testing.vlm_fixtures import TINY_VISION

    text = {**_tiny_text(word_tokenizer(out)), "projection_size": 32}
    SiglipModel(SiglipConfig(text_config=text, vision_config=TINY_VISION)).save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def tiny_lite0_minilm(out: Path) -> Path:
    """The built-in dual encoder's own class (`BuiltinDualEncoder`: EfficientNet-Lite0 image tower, random here, + a
    BERT text tower as MiniLM is one, 2 layers of width 32) saved as a lite0-minilm run saves it. Not in `write_all`:
    the Lite0 tower is 4.6M parameters, built only by the tests that need this family."""
    from transformers import BertConfig, BertModel

    from visiontune.clip.dual_encoder import BuiltinDualEncoder, DualEncoder

    tok = word_tokenizer(out)
    model = BuiltinDualEncoder(BertModel(BertConfig(**_tiny_text(tok))))
    DualEncoder(model, tok, BuiltinDualEncoder.PREPROCESS, "lite0-minilm", "fixture").save(out)
    return out


# ------------------------------------------------------------------------------------------ `visiontune fixtures`

SMOKE_RUNS = "runs/smoke"  # where the printed smoke-test commands put their run folders


def write_everything(out: Path) -> dict[str, Path]:
    """Every fixture under `out`, for smoke-testing each built-in recipe: image models, dual encoders, tiny VLMs,
    tiny causal LMs (vlm_assemble's `language:`) and small data sets (images, captions, conversations, boxes,
    masks). `out` must be new, empty or an earlier fixtures folder (`prepare_output_folder`), so nobody's files are
    overwritten."""
    from visiontune.run.folder import prepare_output_folder
    from visiontune.testing.detect_fixtures import write_detection_sets
    from visiontune.testing.segment_fixtures import write_segmentation_sets
    from visiontune.testing.vlm_fixtures import write_all_lms, write_all_vlms

    out = prepare_output_folder(out, "fixtures")
    written = {**write_all(out), **write_all_vlms(out / "vlm"), **write_all_lms(out / "lm")}
    boxes = {f"boxes-{name}": path for name, path in write_detection_sets(out / "boxes").items()}
    masks = {f"masks-{name}": path for name, path in write_segmentation_sets(out / "masks").items()}
    return {**written, **write_data(out, written["images"]), **boxes, **masks}


def write_data(out: Path, images: Path) -> dict[str, Path]:
    """A captions CSV (align, clip_contrastive), a conversation JSON (vlm_sft, instruct) and preference pairs
    (vlm_preference) over `images`."""
    captions, conversations = ["image,caption"], []
    for path in sorted(images.glob("*/*.png")):
        image, colour = path.relative_to(out).as_posix(), ("red", "green", "blue")[int(path.parent.name[-1]) % 3]
        captions.append(f"{image},a {colour} image with stripes")
        question = {"role": "user", "content": "<image>What colour is this image?"}
        conversations.append({"messages": [question, {"role": "assistant", "content": colour}], "images": [image]})
    (out / "captions.csv").write_text("\n".join(captions) + "\n")
    (out / "conversations.json").write_text(json.dumps(conversations, indent=1))
    (out / "preferences.jsonl").write_text("\n".join(json.dumps(p) for p in preference_pairs(conversations)) + "\n")
    return {
        "captions": out / "captions.csv",
        "conversations": out / "conversations.json",
        "preferences": out / "preferences.jsonl",
    }


def preference_pairs(conversations: list[dict]) -> list[dict]:
    """TRL-style pairs (prompt, chosen, rejected, images) from colour conversations: the rejected answer is the
    next colour."""
    colours = ("red", "green", "blue")
    pairs = []
    for conv in conversations:
        answer = conv["messages"][-1]["content"]
        wrong = colours[(colours.index(answer) + 1) % 3]
        pairs.append(
            {
                "prompt": conv["messages"][:-1],
                "chosen": [conv["messages"][-1]],
                "rejected": [{"role": "assistant", "content": wrong}],
                "images": conv["images"],
            }
        )
    return pairs


def recipe_overrides(root: Path) -> dict[str, list[str]]:
    """Built-in recipe name -> the overrides that run it on the fixtures in `root` for a couple of steps."""
    from visiontune.recipe import RECIPES_DIR, read_yaml

    recipes = {path.stem: read_yaml(path) for path in sorted(RECIPES_DIR.rglob("*.yaml"))}
    smoke = {raw["output_dir"]: f"{SMOKE_RUNS}/{name}" for name, raw in recipes.items()}
    hints = {name: [*_model_overrides(raw, root, smoke), *_data_overrides(raw, root)] for name, raw in recipes.items()}
    # A recipe that starts from another one's run is listed after the ones that do not, so it can run in order.
    return dict(sorted(hints.items(), key=lambda item: any(SMOKE_RUNS in o for o in item[1][1:])))


def _model_overrides(raw: dict, root: Path, smoke: dict[str, str]) -> list[str]:
    from visiontune.registry import TASKS

    spec = TASKS[raw["task"]].smoke
    found = [f"output_dir={smoke[raw['output_dir']]}", "train.max_steps=2", *spec.overrides]
    for key in ("model", "vision", "language", "init_from"):
        if raw.get(key):
            value = _earlier_smoke_run(raw[key], smoke) or _model_fixture(spec.model, key, raw[key], root)
            found.append(f"{key}={value}")
    return found


def _earlier_smoke_run(value: str, smoke: dict[str, str]) -> str | None:
    """A recipe that starts from another built-in recipe's run starts from that recipe's smoke run."""
    for out, run in smoke.items():
        if value == out or value.startswith(out + "/"):
            return run + value[len(out) :]
    return None


def _model_fixture(kind: str, key: str, value: str, root: Path) -> str:
    """The fixture standing in for `value` under recipe key `key`; `kind` is the task's `model:` fixture kind."""
    name = value.lower()
    timm_like = name.startswith(("timm:", "builtin:"))  # the built-in image models are timm CNNs
    if key == "language":
        return str(root / "lm" / ("qwen2" if "qwen" in name else "llama"))
    if key == "vision":
        return f"timm:local-dir:{root / 'timm-cnn'}" if timm_like else str(root / "clip")
    return MODEL_FIXTURES[kind](name, root)


def _vlm_fixture(name: str, root: Path) -> str:
    families = {"llava": "llava", "qwen2.5": "qwen2_5_vl", "qwen": "qwen2_vl"}  # else SmolVLM / Idefics3
    return str(root / "vlm" / next((f for k, f in families.items() if k in name), "idefics3"))


def _image_classifier_fixture(name: str, root: Path) -> str:
    if name.startswith(("timm:", "builtin:")):
        return str(root / ("timm-vit" if "vit" in name else "timm-cnn"))
    return str(root / "hf-vit")


def _detector_fixture(name: str, root: Path) -> str:
    """A backbone under a torchvision detector (builtin:/timm:) -> the tiny timm CNN; else the tiny DETR."""
    return f"timm:local-dir:{root / 'timm-cnn'}" if name.startswith(("timm:", "builtin:")) else str(root / "detr")


def _segmenter_fixture(name: str, root: Path) -> str:
    """A backbone under a decoder (builtin:/timm:) -> the tiny timm CNN; else the tiny SegFormer."""
    return f"timm:local-dir:{root / 'timm-cnn'}" if name.startswith(("timm:", "builtin:")) else str(root / "segformer")


# Fixture kinds a task's registry entry names (registry.Smoke): model name in the recipe -> fixture folder.
MODEL_FIXTURES = {
    "image_classifier": _image_classifier_fixture,
    "dual_encoder": lambda name, root: str(root / ("siglip" if "siglip" in name else "clip")),
    "vlm": _vlm_fixture,
    "detector": _detector_fixture,
    "segmenter": _segmenter_fixture,
}
DATA_FIXTURES = {
    "images": "images",
    "captions": "captions.csv",
    "conversations": "conversations.json",
    "preferences": "preferences.jsonl",  # TRL prompt/chosen/rejected pairs over the same images
    "boxes": "boxes/coco/train.json",  # the same set is also written as YOLO (boxes/yolo) and VOC (boxes/voc)
    "masks": "masks/ids",  # label-id mask folder; also as palette masks, VOC, COCO and `datasets` (masks/*)
}


def _data_overrides(raw: dict, root: Path) -> list[str]:
    """Data paths of the recipe's own (`data/...` placeholders) go to the fixture data; builtin: data is offline."""
    from visiontune.registry import TASKS

    spec, data = TASKS[raw["task"]].smoke, raw.get("data") or {}
    fixture = DATA_FIXTURES[spec.data_by_stage.get(raw.get("stage", ""), spec.data)]
    found = [f"data.train={root / fixture}"] if _own_path(data.get("train")) else []
    found += ["data.val=null"] if _own_path(data.get("val")) else []
    found += [f"data.{key}=null" for key in ("dataset_name", "image_root") if data.get(key)]
    found += [f"wise_ft.control={root / 'images'}"] if _own_path((raw.get("wise_ft") or {}).get("control")) else []
    return found


def _own_path(value: object) -> bool:
    return isinstance(value, str) and not value.startswith("builtin:")
