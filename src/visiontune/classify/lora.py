"""LoRA on attention projections through PEFT; the head stays fully trainable (`modules_to_save`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from visiontune.classify.config import LoraConfig
from visiontune.classify.model import ImageClassifier
from visiontune.core.errors import ModelError

# Attention projection names across timm (qkv) and transformers (query/value, q_proj/v_proj) ViT-style models.
_AUTO_TARGETS = ("qkv", "query", "value", "q_proj", "v_proj", "q", "v")


def apply_lora(model: ImageClassifier, cfg: LoraConfig) -> None:
    head = [h.removeprefix("backbone.") for h in model.head_names()]
    model.backbone = wrap_lora(model.backbone, cfg, _AUTO_TARGETS, head, f"{model.kind} backbone")


def wrap_lora(net: nn.Module, cfg: LoraConfig, auto: Sequence[str], keep: list[str], what: str):
    """`net` as a PEFT model with LoRA on its Linear layers named `cfg.target_modules` ("auto": those of `auto` it
    has); the modules named `keep` (heads) train fully (`modules_to_save`). `what` names `net` in the error."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)})
    targets = [t for t in auto if t in linear] if cfg.target_modules == "auto" else cfg.target_modules
    missing = [t for t in targets if t not in linear]
    if not targets or missing:
        raise ModelError(
            f"tune.lora.target_modules {missing or cfg.target_modules} match no Linear layer of {what}; its Linear "
            f"layers are named {linear}."
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, modules_to_save=keep
    )
    return get_peft_model(net, peft_cfg)


def merge_lora(model: ImageClassifier, adapter_dir=None) -> None:
    """Optionally save the PEFT adapter, then fold LoRA into the base weights so the saved model is plain."""
    from peft import PeftModel

    if isinstance(model.backbone, PeftModel):
        if adapter_dir is not None:
            model.backbone.save_pretrained(str(adapter_dir))
        model.backbone = model.backbone.merge_and_unload()


def merged_net(net: nn.Module) -> nn.Module:
    """`net` with LoRA folded into its weights, so plain transformers / timm load it (as it is without LoRA)."""
    from peft import PeftModel

    return net.merge_and_unload() if isinstance(net, PeftModel) else net
