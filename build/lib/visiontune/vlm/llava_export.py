"""Write an assembled VLM as a plain transformers `LlavaForConditionalGeneration` + `LlavaProcessor`, which
transformers (and serving engines that read the LLaVA format) load and generate with.

Possible when the parts are what LLaVA-1.5 is made of: a transformers vision tower (CLIP/SigLIP) and the
`mlp2x_gelu` projector with hidden width = LM width (LLaVA's `linear_1` → GELU → `linear_2`). Other encoders and
projectors stay in visiontune's own format (vlm/assembled.py), which loads with `load_assembled`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from visiontune.core.errors import ModelError
from visiontune.vlm.assembled import IMAGE_TOKEN, AssembledProcessor, AssembledVlm

__all__ = ["export_llava", "llava_blocker"]


def llava_blocker(model: AssembledVlm) -> str | None:
    """Why the model cannot be written in the LLaVA format, or None when it can."""
    if model.vision.source != "hf":
        return "its vision encoder is not a transformers model (LLaVA loads its tower with AutoModel)"
    projector = model.projector
    if type(projector).__name__ != "Mlp2xGeluProjector" or projector.net[0].out_features != projector.dt:
        return "its projector is not mlp2x_gelu with hidden width = LM width (LLaVA's only projector)"
    return None


def export_llava(model: AssembledVlm, processor: AssembledProcessor, out: Path) -> Path:
    """Save `model` as `LlavaForConditionalGeneration` (weights copied, strict) + `LlavaProcessor` to `out`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    reason = llava_blocker(model)
    if reason:
        raise ModelError(f"cannot export to the LLaVA format: {reason}; the run's model/ folder is the export.")
    vision, language = model.vision, _plain(model.language)
    strategy = "default" if vision.has_cls and vision.drop_cls else "full"
    config = LlavaConfig(
        vision_config=vision.encoder.config.to_dict(),
        text_config=language.config.to_dict(),
        image_token_index=model.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=vision.layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=vision.num_patches,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(language.config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config)
    llava.load_state_dict(_llava_state_dict(model, language), strict=True)
    llava.generation_config = language.generation_config
    llava.save_pretrained(out)
    LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=vision.encoder.config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(vision.has_cls),
        chat_template=processor.chat_template,
        image_token=IMAGE_TOKEN,
    ).save_pretrained(out)
    return out


def _plain(language: nn.Module) -> nn.Module:
    return language.merge_and_unload() if hasattr(language, "merge_and_unload") else language


def _llava_state_dict(model: AssembledVlm, language: nn.Module) -> dict:
    """Our parameter names → LLaVA's: the LM's `model.*` under `model.language_model.*`, the tower under
    `model.vision_tower.*`, the two projector Linears as `linear_1` / `linear_2`."""
    state = {f"model.vision_tower.{k}": v for k, v in model.vision.encoder.state_dict().items()}
    first, last = model.projector.net[0], model.projector.net[2]
    for name, layer in (("linear_1", first), ("linear_2", last)):
        state[f"model.multi_modal_projector.{name}.weight"] = layer.weight
        state[f"model.multi_modal_projector.{name}.bias"] = layer.bias
    for key, value in language.state_dict().items():
        state[f"model.language_model.{key.removeprefix('model.')}" if key.startswith("model.") else key] = value
    return state
