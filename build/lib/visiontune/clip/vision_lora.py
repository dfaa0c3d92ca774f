"""LoRA and L-LoRA on a CLIP classifier's vision tower (PEFT; the text tower stays frozen)."""

from __future__ import annotations

from visiontune.clip.config import ClipLoraConfig
from visiontune.clip.zero_shot import CLIPClassifier
from visiontune.core.errors import ModelError


def apply_vision_lora(clf: CLIPClassifier, cfg: ClipLoraConfig, linearize: bool) -> None:
    """PEFT LoRA on the vision tower only (text tower stays frozen); optionally linearised (L-LoRA)."""
    import re

    from peft import LoraConfig, get_peft_model
    from torch import nn

    vision_linear = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in clf.vision.named_modules()
            if isinstance(m, nn.Linear) and ".vision_model." in f".{n}"
        }
    )
    missing = [t for t in cfg.target_modules if t not in vision_linear]
    if missing:
        raise ModelError(
            f"tune.lora.target_modules {missing} match no Linear layer of the vision tower; its Linear "
            f"layers are named {vision_linear}."
        )
    pattern = rf".*\.vision_model\..*\.({'|'.join(map(re.escape, cfg.target_modules))})"
    peft_cfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0 if linearize else cfg.dropout, target_modules=pattern
    )
    vision = get_peft_model(clf.vision, peft_cfg)
    clf.lora_settings = {"r": cfg.r, "alpha": cfg.alpha, "target_modules": list(cfg.target_modules)}
    if linearize:
        from visiontune.clip.llora import linearize_lora

        vision = linearize_lora(vision)
    clf.vision = vision
