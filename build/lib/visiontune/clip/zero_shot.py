"""Zero-shot classification heads from text prompts, and `CLIPClassifier`: a dual encoder's vision tower behind
a frozen head of averaged, normalised class-prompt embeddings (logits = logit_scale * cos(image, class))."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.clip.dual_encoder import DualEncoder, image_features

BUILTIN_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a drawing of a {}.",
    "a handwritten {}.",
]
VISION_PREFIXES = ("vision_model.", "visual_projection.")  # CLIP, SigLIP and the built-in encoder alike


def prompts(class_name: str, templates: list[str] | str) -> list[str]:
    return [t.format(class_name) for t in (BUILTIN_TEMPLATES if templates == "builtin" else templates)]


@torch.no_grad()
def zero_shot_head(encoder: DualEncoder, class_names: list[str], templates: list[str] | str) -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised prompt embeddings, normalised again (CLIP's recipe)."""
    rows = []
    for name in class_names:
        emb = encoder.encode_texts(prompts(name, templates))  # [T, D], unit rows
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


class VisionTower(nn.Module):
    """pixel_values -> image embedding [B, D]. Holds the whole dual encoder so saving keeps the text side; only
    vision parameters are ever trainable."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_features(self.model, pixel_values)


class CLIPClassifier(nn.Module):
    """Same interface as `ImageClassifier` (forward -> {"loss", "logits"}), so the classify pipeline runs it."""

    kind = "clip"

    def __init__(self, encoder: DualEncoder, class_names: list[str], templates: list[str] | str):
        super().__init__()
        self.encoder, self.templates = encoder, templates
        self.vision: nn.Module = VisionTower(encoder.model)
        self.preprocess = encoder.preprocess
        self.label_smoothing = 0.0
        self.lora_settings: dict | None = None  # set by apply_vision_lora; saved with L-LoRA models
        self.register_buffer("scale", encoder.logit_scale().clone().float(), persistent=False)
        self.set_head(class_names)

    def train(self, mode: bool = True) -> CLIPClassifier:
        """BatchNorm layers (the built-in EfficientNet tower) keep their running statistics: the zero-shot head was
        aligned to features normalised by them, and small fine-tuning batches would otherwise shift every feature
        between train and eval mode (measured: 97% zero-shot fell to 51% after one epoch)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def set_head(self, class_names: list[str]) -> None:
        """Swap in the zero-shot head of another class list (continual tasks, evaluation on new data)."""
        self.class_names = list(class_names)
        self.register_buffer("head", zero_shot_head(self.encoder, self.class_names, self.templates), persistent=False)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        emb = F.normalize(self.vision(pixel_values), dim=-1)  # [B, D]
        logits = self.scale * emb @ self.head.to(emb.dtype).T  # [B, C]
        if labels is None:
            return {"logits": logits}
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}

    def freeze_all_but_vision(self) -> None:
        for name, p in self.encoder.model.named_parameters():
            p.requires_grad_(name.startswith(VISION_PREFIXES))

    def head_names(self) -> list[str]:
        return []

    def enable_grad_checkpointing(self) -> bool:
        model = self.encoder.model
        if getattr(model, "supports_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return True
        return False

    def vision_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.encoder.model.state_dict().items() if k.startswith(VISION_PREFIXES)}

    def save(self, directory: str | Path, adapter_dir: str | Path | None = None) -> Path:
        """LoRA is merged into the vision tower (adapters for the plain model classes kept in `adapter_dir`, see
        `save_plain_adapters`); L-LoRA cannot be merged — its linearised parameters are saved beside the base model
        and `load_clip_classifier` rebuilds the wrapper."""
        from peft import PeftModel

        directory = Path(directory)
        extra = {"class_names": self.class_names, "templates": self.templates}
        linearized = _linearized_state(self.vision)
        if linearized is not None:
            extra["l_lora"] = self.lora_settings
        elif isinstance(self.vision, PeftModel):
            if adapter_dir is not None:
                save_plain_adapters(self.vision, Path(adapter_dir), self)
            self.vision = self.vision.merge_and_unload()
        self.encoder.save(directory, extra_meta=extra)
        if linearized is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in linearized.items()}, str(directory / "linearized.safetensors"))
        return directory


VISION_ONLY_ADAPTER = "vision"  # subfolder of the adapter folder for CLIPVisionModel / SiglipVisionModel


def save_plain_adapters(vision: nn.Module, directory: Path, clf: CLIPClassifier) -> None:
    """PEFT would key the adapter by visiontune's wrapper (`model.vision_model....`), which no plain model has.
    Written instead: `directory` keyed like the dual encoder (`CLIPModel`, `SiglipModel`: `vision_model....`) and
    `directory/vision` like its vision-only class (`CLIPVisionModel`, `SiglipVisionModel`), whose modules in
    transformers 5 are the dual encoder's `vision_model` children: `PeftModel.from_pretrained` loads either."""
    from peft import get_peft_model_state_dict

    wrapped = "base_model.model.model."  # PeftModel -> VisionTower -> dual encoder
    state = {k.removeprefix(wrapped): v for k, v in get_peft_model_state_dict(vision).items()}
    targets = "|".join(map(re.escape, clf.lora_settings["target_modules"]))
    model_class = type(clf.encoder.model)
    mapping = {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}
    _write_adapter(vision, directory, state, rf"vision_model\..*\.({targets})", clf.encoder.source, mapping)
    tower = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    _write_adapter(vision, directory / VISION_ONLY_ADAPTER, tower, rf".*\.({targets})", clf.encoder.source, None)


def _write_adapter(
    vision: nn.Module, directory: Path, state: dict, targets: str, source: str, auto_mapping: dict | None
) -> None:
    """One PEFT adapter folder: the training LoRA config with `targets`, weights keyed `base_model.model.<name>`."""
    import copy

    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    config = copy.deepcopy(vision.peft_config[vision.active_adapter])
    config.target_modules, config.inference_mode = targets, True
    config.base_model_name_or_path = None if source.startswith("builtin:") else source
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)
    weights = {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}
    save_file(weights, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def _linearized_state(vision: nn.Module) -> dict[str, torch.Tensor] | None:
    from visiontune.clip.llora import LinearizedModel

    return vision.state_dict() if isinstance(vision, LinearizedModel) else None


def read_saved_meta(path: Path) -> dict:
    from visiontune.core.manifest import read_manifest

    return read_manifest(Path(path))
