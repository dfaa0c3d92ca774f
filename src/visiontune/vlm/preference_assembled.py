"""vlm_preference on an assembled VLM (`init_from` a vlm_assemble run): loading, LoRA and the export.

The whole `AssembledVlm` (vision → projector → causal LM) goes under one PEFT model: LoRA on the language model's
Linear layers, and the parts that train fully (projector, vision) as PEFT `modules_to_save`. So PEFT's
`disable_adapter()` gives the frozen start for the reference — adapters off and the original projector — with no
second copy, exactly as for the transformers families (vlm_assemble's own LoRA covers only the LM, which would leave a
trained projector in the "reference"). TRL cannot take this model; the loss is vlm/preference_loss.py's, shown equal
to TRL's on the same log-probs in tests/vlm/test_preference_assembled.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from visiontune.core.errors import ModelError, RecipeError
from visiontune.vlm.assembled import AssembledProcessor, AssembledVlm, assembled_in, load_assembled


def assembled_folder(init_from: str) -> Path:
    if folder := assembled_in(init_from):
        return folder
    raise RecipeError(
        f"init_from: {init_from} is not a vlm_assemble run (no model/visiontune.json of an assembled VLM); point it "
        "at the run folder of a vlm_assemble instruct (or align) stage, or use `model` for a transformers VLM."
    )


def load_assembled_start(cfg: Any) -> tuple[AssembledVlm, AssembledProcessor]:
    model, processor = load_assembled(assembled_folder(cfg.init_from))
    if cfg.chat_template:
        processor.chat_template = cfg.chat_template
    return model, processor


def tune_assembled(model: AssembledVlm, tune: Any) -> nn.Module:
    """Freeze per part; LoRA: one PEFT model over the whole VLM (see the module docstring)."""
    wanted = {"vision": tune.train_vision, "projector": tune.train_projector, "language": tune.train_language}
    for part, on in wanted.items():
        getattr(model, part).requires_grad_(on and tune.method == "full")
    if tune.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    leaves = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.language.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    )
    chosen = leaves if tune.lora_target == "all" else tune.lora_target
    missing = [t for t in chosen if t not in leaves]
    if missing or not chosen:
        raise ModelError(f"tune.lora_target {missing} match no Linear layer of the language model; it has {leaves}.")
    config = LoraConfig(
        r=tune.lora_r,
        lora_alpha=tune.lora_alpha,
        lora_dropout=tune.lora_dropout,
        target_modules=rf"^language\..*\.(?:{'|'.join(map(re.escape, chosen))})$",
        modules_to_save=[p for p in ("vision", "projector") if wanted[p]] or None,
    )
    return get_peft_model(model, config)


def full_tuning_trainer() -> type:
    """PreferenceTrainer whose checkpoints hold only the trained parameters, as vlm_assemble's: the assembled VLM is
    no transformers model, and its tied LM embeddings stop safetensors from saving its whole state dict."""
    from visiontune.vlm.assemble import AssembleTrainer
    from visiontune.vlm.preference import PreferenceTrainer

    return type(
        "AssembledPreferenceTrainer",
        (PreferenceTrainer,),
        {"_save": AssembleTrainer._save, "_issue_warnings_after_load": AssembleTrainer._issue_warnings_after_load},
    )


def trainable_parts(model: Any) -> dict[str, int]:
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = name.removeprefix("base_model.model.").split(".")[0]
            counts[part if part in counts else "language"] += p.numel()
    return counts


def save_assembled(model: Any, processor: AssembledProcessor, run_dir: Path) -> dict:
    """`model/` in vlm_assemble's format (LoRA merged, the trained projector in place), which eval, ask, predict,
    pairs and a further vlm_preference run load."""
    counts = trainable_parts(model)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.meta["stage"] = "preference"
    merged.save_pretrained(run_dir / "model", processor)
    return {"trainable_parameters": counts}
