"""Vision-language models through `AutoModelForImageTextToText` + `AutoProcessor`, with per-family part names so
the recipe can freeze or train the vision tower, the projector and the language model, and LoRA / QLoRA on the
language model (PEFT, bitsandbytes).

Adding a family = one `FAMILY_PARTS` entry (the parameter-name prefixes of its three parts, read off
`model.named_parameters()`), a tiny fixture in `vlm_fixtures.py`, and the masking golden test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visiontune.core.errors import ModelError, RecipeError
from visiontune.core.sources import parse_source, pretrained_config
from visiontune.vlm.config import VlmSftConfig, VlmTuneConfig
from visiontune.vlm.quantized import keep_trainable_layout


@dataclass(frozen=True)
class Parts:
    vision: tuple[str, ...]
    projector: tuple[str, ...]  # checked first: Qwen's projector (merger) lives inside its vision tower
    language: tuple[str, ...]


_IDEFICS3 = Parts(("model.vision_model.",), ("model.connector.",), ("model.text_model.", "lm_head."))
_QWEN = Parts(("model.visual.",), ("model.visual.merger.",), ("model.language_model.", "lm_head."))
FAMILY_PARTS: dict[str, Parts] = {
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "llava": Parts(("model.vision_tower.",), ("model.multi_modal_projector.",), ("model.language_model.", "lm_head.")),
}


def load_vlm(cfg: VlmSftConfig) -> tuple[nn.Module, Any]:
    """Model + processor from a hub id or folder, weights in `tune.dtype`; QLoRA loads the language model's Linear
    layers in 4-bit nf4 or 8-bit (`tune.qlora_bits`)."""
    from transformers import AutoModelForImageTextToText

    location = _location(cfg.model)
    instead = "a local folder (`visiontune fixtures DIR` writes tiny ones to try a recipe)"
    config = pretrained_config(location, "model", cfg.model, instead)
    family = family_of(config.model_type, cfg.model)
    kwargs: dict[str, Any] = {"dtype": DTYPES.get(cfg.tune.dtype, "auto")}
    if cfg.tune.method == "qlora":
        kwargs["quantization_config"] = quantization_config(family, cfg.tune.qlora_bits, cfg.train.precision)
    model = AutoModelForImageTextToText.from_pretrained(location, **kwargs)
    model.visiontune_family = family
    # read by enable_grad_checkpointing, which every VLM task calls with the model alone
    model.visiontune_checkpoint_offload = cfg.train.grad_checkpointing_offload
    return model, load_processor(cfg)


def load_processor(cfg: VlmSftConfig) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(_location(cfg.model))
    if cfg.chat_template:
        processor.chat_template = cfg.chat_template
    if not getattr(processor, "chat_template", None):
        raise RecipeError(f"model: {cfg.model} has no chat template; set the recipe key `chat_template` (Jinja).")
    return processor


def _location(name: str) -> str:
    """What transformers loads for vlm_sft's `model:`: a folder's path or a hub id (no builtin or timm model is a
    VLM; builtin parts make one with task: vlm_assemble)."""
    source = parse_source(name, "model")
    if source.kind in ("builtin", "timm"):
        raise ModelError(
            f"model: {name} is not a vision-language model; vlm_sft takes a transformers VLM folder or hub id "
            "(task: vlm_assemble builds one from builtin parts)."
        )
    return source.name


def family_of(model_type: str, name: str) -> str:
    if model_type not in FAMILY_PARTS:
        raise ModelError(
            f"model: {name} is a `{model_type}` model; vlm_sft supports {sorted(FAMILY_PARTS)} "
            "(see CONTRIBUTING.md to add a family)."
        )
    return model_type


def part_of(name: str, parts: Parts) -> str:
    for part in ("projector", "vision", "language"):
        if name.startswith(getattr(parts, part)):
            return part
    return "language"  # anything else (e.g. tied embeddings) goes with the language model


def apply_tuning(model: nn.Module, tune: VlmTuneConfig) -> nn.Module:
    """Freeze per part; with LoRA/QLoRA the language model gets adapters and the other trained parts train fully.
    4-bit layers (QLoRA, or a 4-bit checkpoint) keep a trainable layout through any evaluation (vlm/quantized.py)."""
    keep_trainable_layout(model)
    parts = FAMILY_PARTS[model.visiontune_family]
    wanted = {"vision": tune.train_vision, "projector": tune.train_projector, "language": tune.train_language}
    if tune.method == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(wanted[part_of(name, parts)])
        return model
    return _lora(model, tune, parts, wanted)


def enable_grad_checkpointing(model: nn.Module, offload: bool | None = None) -> None:
    """Recompute each decoder block's activations in backward: less memory for about a third more compute.
    Non-reentrant checkpointing, so blocks behind frozen embeddings (LoRA) still get gradients. `offload`: the
    activations kept for the recompute go to CPU memory (train.grad_checkpointing_offload; None: as load_vlm
    recorded it on the model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise RecipeError(f"train.grad_checkpointing: {type(base).__name__} does not support it; set it to false.")
    if offload is None:
        offload = getattr(base, "visiontune_checkpoint_offload", False)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=offload)


def _lora(model: nn.Module, tune: VlmTuneConfig, parts: Parts, wanted: dict[str, bool]) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if tune.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = _language_linear_leaves(model, parts)
    chosen = targets if tune.lora_target == "all" else tune.lora_target
    missing = [t for t in chosen if t not in targets]
    if missing or not chosen:
        raise ModelError(f"tune.lora_target {missing} match no Linear layer of the language model; it has {targets}.")
    prefixes = "|".join(re.escape(p.rstrip(".")) for p in parts.language if p != "lm_head.")
    pattern = rf"^(?:{prefixes})\..*\.(?:{'|'.join(map(re.escape, chosen))})$"
    full_parts = [p for p in ("vision", "projector") if wanted[p]]
    to_save = [getattr(parts, p)[0].rstrip(".").removeprefix("model.") for p in full_parts]
    config = LoraConfig(
        r=tune.lora_r,
        lora_alpha=tune.lora_alpha,
        lora_dropout=tune.lora_dropout,
        target_modules=pattern,
        modules_to_save=to_save or None,
    )
    return get_peft_model(model, config)


def _language_linear_leaves(model: nn.Module, parts: Parts) -> list[str]:
    lang = tuple(p for p in parts.language if p != "lm_head.")
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n.startswith(lang) and _is_linear(m)}
    return sorted(leaves)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # tune.dtype; auto: the checkpoint's


def quantization_config(family: str, bits: int, precision: str) -> Any:
    """bitsandbytes settings for QLoRA: the language model's Linear layers in 4-bit nf4 (double quantised) or 8-bit
    LLM.int8; the vision tower, projector and lm_head stay unquantised. 4-bit layers compute in train.precision's
    dtype (bf16/fp16 halve the dequantised weights and the matmul; fp32 is the exact one)."""
    from transformers import BitsAndBytesConfig

    parts = FAMILY_PARTS[family]
    skip = [p.rstrip(".") for p in (*parts.vision, *parts.projector)] + ["lm_head"]
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[precision],
        llm_int8_skip_modules=skip,
    )


def trainable_summary(model: nn.Module) -> dict[str, int]:
    parts = FAMILY_PARTS[getattr(model, "visiontune_family", None) or model.get_base_model().visiontune_family]
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[part_of(_strip_peft(name), parts)] += p.numel()
    return counts


def _strip_peft(name: str) -> str:
    return name.removeprefix("base_model.model.")
