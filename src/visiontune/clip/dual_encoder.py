"""CLIP-family dual encoders behind one small interface: transformers `CLIPModel` / `SiglipModel` (hub id or
folder) and visiontune's built-in EfficientNet-Lite0 + MiniLM encoder (`builtin:lite0-minilm`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.core.errors import ModelError
from visiontune.core.manifest import read_manifest, write_manifest
from visiontune.core.sources import ModelSource, parse_source, pretrained_config
from visiontune.core.transforms import Preprocess

# model_type -> how its text side is tokenised (SigLIP was trained on max_length padding and pools the last token).
FAMILIES = {"clip": "longest", "siglip": "max_length", "siglip2": "max_length", "lite0-minilm": "longest"}
OTHER_TASKS = {
    "llava": "vlm_sft",
    "idefics3": "vlm_sft",
    "smolvlm": "vlm_sft",
    "qwen2_vl": "vlm_sft",
    "qwen2_5_vl": "vlm_sft",
    "vit": "classify",
    "convnext": "classify",
    "resnet": "classify",
}


@dataclass
class DualEncoder:
    model: nn.Module  # get_image_features / get_text_features / logit_scale, like transformers CLIPModel
    tokenizer: Any
    preprocess: Preprocess
    family: str
    source: str
    image_processor: Any = None
    meta: dict = field(default_factory=dict)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_features(self.model, pixel_values), dim=-1)  # [B, D]

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[i : i + batch_size]).to(device)
            out.append(F.normalize(text_features(self.model, **batch), dim=-1))
        return torch.cat(out)  # [T, D]

    def tokenize(self, texts: list[str]):
        limit = max_text_length(self.model, self.tokenizer)
        return self.tokenizer(
            texts, padding=FAMILIES[self.family], truncation=True, max_length=limit, return_tensors="pt"
        )

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().reshape(())

    def save(self, directory: Path, extra_meta: dict | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        state = plain_state(self.model)  # scalars held as vectors for sharding go back to 0-dim
        if isinstance(self.model, BuiltinDualEncoder):
            self.model.save(directory, state)
        else:
            self.model.save_pretrained(directory, state_dict=state)
        self.tokenizer.save_pretrained(directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(directory)
        fields = {"family": self.family, "preprocess": self.preprocess.to_dict(), **self.meta, **(extra_meta or {})}
        write_manifest(directory, "dual_encoder", **fields)
        return directory


SCALARS_HELD = "_visiontune_scalars_held"  # attribute on the model: names of 0-dim parameters held as [1] vectors


def hold_scalars_as_vectors(model: nn.Module) -> list[str]:
    """Hold each 0-dimensional parameter (CLIP's temperature `logit_scale`) as a 1-element vector while DeepSpeed or
    FSDP2 trains it; returns their names.

    What both lack: DeepSpeed's (0.19.8) engine starts by broadcasting every whole parameter from rank 0 as bytes,
    `p.data.view(torch.uint8)`, and torch cannot view a 0-dim float tensor as bytes ("self.dim() cannot be 0"), so
    both ZeRO-2 and ZeRO-3 stop before the first step; torch's `fully_shard` shards every parameter on dim 0 and
    refuses one without dims. A [1] vector broadcasts the same way wherever the scalar is used
    (`logit_scale.exp() * logits`; our own readers `.reshape(())` it). `DualEncoder.save` writes the 0-dim shape
    back, so the export is what plain transformers / open_clip load."""
    held = []
    for name, p in list(model.named_parameters()):
        if p.dim() == 0 and not hasattr(p, "ds_id"):  # ds_id: partitioned at load (zero.Init), never broadcast
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, nn.Parameter(p.detach().reshape(1), p.requires_grad))
            held.append(name)
    setattr(model, SCALARS_HELD, [*getattr(model, SCALARS_HELD, []), *held])
    return held


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with the parameters `hold_scalars_as_vectors` reshaped back to 0-dim."""
    state = model.state_dict()
    for name in getattr(model, SCALARS_HELD, []):
        state[name] = state[name].reshape(())
    return state


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=pixel_values)
    return getattr(out, "pooler_output", out)  # transformers 5 returns a ModelOutput with projected embeds


def text_features(model: nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    out = model.get_text_features(**batch)
    return getattr(out, "pooler_output", out)


def max_text_length(model: nn.Module, tokenizer: Any) -> int:
    config = getattr(getattr(model, "config", None), "text_config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 77)
    return min(int(limit), 512)


def resolve_dual_encoder(name: str) -> DualEncoder:
    """Hub id, folder (transformers or visiontune format; a run folder's model/) or `builtin:lite0-minilm`."""
    source = parse_source(name, "model")
    if source.kind == "builtin":
        if source.name != "lite0-minilm":
            raise ModelError(f"model: {name} is not a dual encoder; the built-in dual encoder is builtin:lite0-minilm.")
        return _builtin_pretrained()
    if source.kind == "timm":
        raise ModelError(f"model: {name} is a timm image model, not a CLIP-style dual encoder; it fits task: classify.")
    if source.path is None:  # a hub id
        return _transformers(source, {})
    meta = read_manifest(source.path)
    if meta.get("family") == "lite0-minilm":
        return _builtin_saved(source.path, meta)
    return _transformers(source, meta)


def _transformers(source: ModelSource, meta: dict) -> DualEncoder:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    name = source.name
    config = pretrained_config(name, "model", source.text, "a local CLIP/SigLIP folder or builtin:lite0-minilm")
    family = config.model_type
    if family not in FAMILIES:
        fits = OTHER_TASKS.get(family, "classify or vlm_sft")
        raise ModelError(
            f"model: {source.text} is a `{family}` model, not a CLIP-style dual encoder; it fits task: {fits}."
        )
    model = AutoModel.from_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    processor = AutoImageProcessor.from_pretrained(name)
    preprocess = _preprocess_from(meta) or Preprocess(
        _edge(processor), tuple(processor.image_mean), tuple(processor.image_std), "bicubic"
    )
    return DualEncoder(model, tokenizer, preprocess, family, name, processor, _carry(meta))


def _builtin_pretrained() -> DualEncoder:
    from transformers import AutoTokenizer

    from visiontune.core.assets import minilm_dir

    model = BuiltinDualEncoder.build(minilm_dir(), pretrained=True)
    return DualEncoder(
        model,
        AutoTokenizer.from_pretrained(minilm_dir()),
        BuiltinDualEncoder.PREPROCESS,
        "lite0-minilm",
        "builtin:lite0-minilm",
    )


def _builtin_saved(path: Path, meta: dict) -> DualEncoder:
    from transformers import AutoTokenizer

    model = BuiltinDualEncoder.load(path)
    return DualEncoder(
        model,
        AutoTokenizer.from_pretrained(path),
        _preprocess_from(meta),
        "lite0-minilm",
        str(path),
        None,
        _carry(meta),
    )


def _carry(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("format", "kind", "family", "preprocess")}


def _preprocess_from(meta: dict) -> Preprocess | None:
    pre = meta.get("preprocess")
    if not pre:
        return None
    return Preprocess(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), pre.get("interpolation", "bicubic"))


def _edge(processor: Any) -> int:
    from visiontune.classify.resolve import square_edge as edge

    return edge(getattr(processor, "crop_size", None) or {}) or edge(processor.size) or 224


class BuiltinDualEncoder(nn.Module):
    """EfficientNet-Lite0 (ImageNet) image tower + all-MiniLM-L6-v2 text tower + linear projections to a shared
    space, with CLIP's learnable temperature. Both towers are real pretrained networks shipped in PyPI packages;
    the projections start random and are learnt contrastively (recipe `clip/mnist-dual-encoder`)."""

    PREPROCESS = Preprocess(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    EMBED_DIM = 256

    def __init__(self, text_model: nn.Module):
        super().__init__()
        import timm

        self.vision_model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        self.visual_projection = nn.Linear(self.vision_model.num_features, self.EMBED_DIM, bias=False)
        self.text_model = text_model
        self.text_projection = nn.Linear(text_model.config.hidden_size, self.EMBED_DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @classmethod
    def build(cls, text_dir: Path, pretrained: bool) -> BuiltinDualEncoder:
        from transformers import AutoConfig, AutoModel

        from visiontune.core.assets import efficientnet_lite0_state_dict

        text = (
            AutoModel.from_pretrained(text_dir)
            if pretrained
            else AutoModel.from_config(AutoConfig.from_pretrained(text_dir))
        )
        model = cls(text)
        if pretrained:
            weights = {k: v for k, v in efficientnet_lite0_state_dict().items() if not k.startswith("classifier.")}
            model.vision_model.load_state_dict(weights)
        return model

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values))  # [B, D]

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.text_model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean pooling, as MiniLM was trained
        return self.text_projection(pooled)

    def save(self, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        self.text_model.config.save_pretrained(directory / "text_config")
        state = self.state_dict() if state is None else state
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> BuiltinDualEncoder:
        from safetensors.torch import load_file

        model = cls.build(directory / "text_config", pretrained=False)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model
