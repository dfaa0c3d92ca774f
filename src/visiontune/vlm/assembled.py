"""A LLaVA-style VLM assembled from parts: vision encoder → projector → any causal LM, and its processor.

`AssembledVlm` replaces each `<image>` token's embedding with one projected image token (the processor writes as
many `<image>` tokens as the projector makes per image), then runs the LM on `inputs_embeds`. `AssembledProcessor`
has the call signature of a transformers VLM processor, so vlm_sft's tokenisation (assistant-only labels, image-safe
truncation, cache), collator and generation eval serve this task unchanged.

Own code because transformers' `LlavaForConditionalGeneration` takes only a transformers vision tower and its one
MLP projector; this class takes timm encoders and every projector of vlm/projectors.py. When the parts fit
LLaVA's format, vlm/llava_export.py writes a plain `LlavaForConditionalGeneration` from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visiontune.core.errors import ModelError
from visiontune.core.manifest import MANIFEST, read_manifest, write_manifest
from visiontune.core.sources import parse_source
from visiontune.vlm.projectors import Projector, build_projector
from visiontune.vlm.vision_features import VisionFeatures, load_vision, save_vision

__all__ = ["IMAGE_TOKEN", "META", "AssembledProcessor", "AssembledVlm", "flattening_template", "load_assembled"]

IMAGE_TOKEN = "<image>"
META = MANIFEST
KIND = "assembled_vlm"

# Prepended to the LM's own chat template: turns list-of-parts contents (`{"type": "image"}`, `{"type": "text"}`)
# into the plain strings text-only templates expect, with "<image>\n" where each image goes. The same template
# serves this processor and the exported LlavaProcessor, so both render identical prompts.
_FLATTEN = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.messages = ns.messages + [m] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


def flattening_template(template: str) -> str:
    return template if template.startswith(_FLATTEN) else _FLATTEN + template


class AssembledProcessor:
    """Tokenizer + image processor; expands each `<image>` into `num_image_tokens` image tokens."""

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, image_processor: Any, num_image_tokens: int):
        self.tokenizer, self.image_processor, self.num_image_tokens = tokenizer, image_processor, num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    @chat_template.setter
    def chat_template(self, template: str) -> None:
        self.tokenizer.chat_template = flattening_template(template)

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False, **kwargs: Any
    ) -> Any:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def __call__(
        self, text: list[str] | str, images: list | None = None, return_tensors: str = "pt", **_: Any
    ) -> dict[str, Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        rows = [
            self._expand(self.tokenizer(t)["input_ids"]) for t in texts
        ]  # special tokens as LlavaProcessor adds them
        n_placeholders = sum(row.count(self.image_token_id) for row in rows) // self.num_image_tokens
        if n_placeholders != len(images or []):
            raise ModelError(
                f"the text has {n_placeholders} {IMAGE_TOKEN} placeholders but {len(images or [])} "
                "images were given; give one image per placeholder."
            )
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        out = {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        }
        if images:
            out.update(self.image_processor(images=images, return_tensors="pt"))
        return out

    def _expand(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(Path(folder) / "language")


class AssembledVlm(nn.Module):
    """vision → projector → language; `forward` returns the LM's output (loss + the MoE balance term)."""

    def __init__(
        self,
        vision: VisionFeatures,
        projector: Projector,
        language: nn.Module,
        image_token_id: int,
        meta: dict[str, Any],
    ):
        super().__init__()
        self.vision, self.projector, self.language = vision, projector, language
        self.image_token_id, self.meta = image_token_id, meta
        self.balance_loss: float | None = None  # last MoE load-balancing loss, for logging

    def train(self, mode: bool = True) -> AssembledVlm:
        """A frozen encoder stays in eval mode: its BatchNorm statistics and dropout must not change. A trained one
        keeps its BatchNorm statistics as pretrained too: a VLM's batches (8 images) are too small to estimate them."""
        super().train(mode)
        if not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()
        for module in self.vision.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.vision(pixel_values)  # [I, N, Dv]
        return self.projector(features)  # [I, M, Dt]

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None, image: Tensor | None = None) -> Tensor:
        """Token embeddings with the image tokens' rows replaced; `image`: projected image embeddings computed
        already (vlm_preference encodes a pair's images once for both answers), instead of `pixel_values`."""
        embeds = self.language.get_input_embeddings()(input_ids)  # [B, T, Dt]
        mask = input_ids == self.image_token_id  # [B, T]
        if pixel_values is None and image is None:
            if mask.any():
                raise ModelError("the inputs hold image tokens but no pixel_values were given.")
            stand_in = getattr(self, "visiontune_stand_in", None)  # ranks on mixed data: vlm/mixed_batches.py
            return embeds if stand_in is None else embeds + stand_in.zero_for(embeds)
        if image is None:
            image = self.image_embeds(pixel_values.to(embeds.dtype))  # [I, M, Dt]
        if int(mask.sum()) != image.shape[0] * image.shape[1]:
            raise ModelError(
                f"the inputs hold {int(mask.sum())} image tokens but {image.shape[0]} images make "
                f"{image.shape[0] * image.shape[1]}; tokenise with this model's processor."
            )
        return embeds.masked_scatter(mask[..., None], image.to(embeds.dtype))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        use_cache: bool | None = None,
        image_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> Any:
        out = self.language(
            inputs_embeds=self.embed(input_ids, pixel_values, image_embeds),
            attention_mask=attention_mask,
            labels=labels,
            position_ids=position_ids,  # packed rows (data.packing): positions restart at every record
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,  # vlm_preference: logits of the answers only
        )
        aux = getattr(self.projector, "aux_loss", None)
        if labels is not None and pixel_values is not None and aux is not None:
            self.balance_loss = float(aux.detach())
            out.loss = out.loss + self.projector.balance_coef * aux
        return out

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """Greedy/sampled continuation; returns prompt + new ids, as transformers VLMs do."""
        new = self.language.generate(
            inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask, **kwargs
        )
        # several sequences per prompt (num_return_sequences, beams) come back as consecutive rows
        return torch.cat([input_ids.repeat_interleave(new.shape[0] // input_ids.shape[0], dim=0), new], dim=1)

    def save_pretrained(self, folder: str | Path, processor: AssembledProcessor | None = None) -> Path:
        """`language/` (transformers folder + tokenizer), `vision/`, `projector.safetensors`, `visiontune.json`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        language = self.language.merge_and_unload() if hasattr(self.language, "merge_and_unload") else self.language
        language.save_pretrained(folder / "language")
        preprocess = save_vision(self.vision, processor.image_processor if processor else None, folder / "vision")
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, folder / "projector.safetensors")
        if processor is not None:
            processor.save_pretrained(folder)
        meta = {
            **{k: v for k, v in self.meta.items() if k not in ("format", "kind")},
            "vision": self.vision.spec(),
            "preprocess": preprocess,
            "num_image_tokens": self.projector.output_tokens(self.vision.num_patches),
        }
        write_manifest(folder, KIND, **meta)
        return folder


def is_assembled(folder: str | Path) -> bool:
    return read_manifest(Path(folder)).get("kind") == KIND


def assembled_in(run_or_model: str | Path) -> Path | None:
    """The assembled model of a run folder (its `model/`) or of a model folder itself; None when neither holds one."""
    path = Path(run_or_model).expanduser()
    return next((c for c in (path / "model", path) if is_assembled(c)), None)


def load_assembled(folder: str | Path) -> tuple[AssembledVlm, AssembledProcessor]:
    """Model + processor from a folder `AssembledVlm.save_pretrained` wrote (a run's `model/`)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not is_assembled(folder):
        raise ModelError(
            f"{folder} is not an assembled VLM (no {META} of kind {KIND}); give a vlm_assemble run's model/ folder."
        )
    meta = read_manifest(folder)
    vision, image_processor = load_vision(folder / "vision", meta["vision"], meta.get("preprocess"))
    language = AutoModelForCausalLM.from_pretrained(folder / "language")
    tokenizer = AutoTokenizer.from_pretrained(folder / "language")
    projector = build_projector(
        meta["projector"]["kind"],
        vision.width,
        language.config.hidden_size,
        **projector_options(meta["projector"], vision),
    )
    projector.load_state_dict(load_file(folder / "projector.safetensors"))
    processor = AssembledProcessor(tokenizer, image_processor, meta["num_image_tokens"])
    return AssembledVlm(vision, projector, language, processor.image_token_id, meta).eval(), processor


def projector_options(spec: dict[str, Any], vision: VisionFeatures) -> dict[str, Any]:
    """The recipe's projector options, plus what is read off the encoder (patch_reducer's input patch count)."""
    options = dict(spec.get("options", {}))
    if spec["kind"] == "patch_reducer":
        options.setdefault("num_patches_in", vision.num_patches)
        options.setdefault("num_tokens_out", max(1, vision.num_patches // 4))
    return options


def build_assembled(
    vision_name: str,
    language_name: str,
    projector: dict[str, Any],
    vision_layer: int = -1,
    drop_cls: bool = True,
    image_size: int | None = None,
    chat_template: str | None = None,
    seed: int = 0,
) -> tuple[AssembledVlm, AssembledProcessor]:
    """A new VLM from a `vision:` and a `language:` source with a freshly initialised projector (seeded)."""
    from visiontune.vlm.vision_features import resolve_vision

    vision, image_processor = resolve_vision(vision_name, vision_layer, drop_cls, image_size)
    language, tokenizer = resolve_language(language_name)
    _prepare_tokenizer(tokenizer, chat_template, language_name)
    _grow_vocabulary(language, len(tokenizer))
    torch.manual_seed(seed)
    proj = build_projector(
        projector["kind"], vision.width, language.config.hidden_size, **projector_options(projector, vision)
    )
    processor = AssembledProcessor(tokenizer, image_processor, proj.output_tokens(vision.num_patches))
    meta = {"vision_source": vision_name, "language_source": language_name, "projector": projector}
    return AssembledVlm(vision, proj, language, processor.image_token_id, meta), processor


def _grow_vocabulary(language: nn.Module, size: int) -> None:
    """Room for the `<image>` token. The new rows are the mean of the old ones, not random draws: a tied LM head
    scores every position against them, and a rebuilt model (resume) must get exactly the same frozen weights."""
    old = language.get_input_embeddings().num_embeddings
    if size <= old:
        return
    language.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for layer in (language.get_input_embeddings(), language.get_output_embeddings()):
            if layer is not None:
                layer.weight[old:] = layer.weight[:old].mean(dim=0)
                if getattr(layer, "bias", None) is not None:
                    layer.bias[old:] = layer.bias[:old].mean()


def resolve_language(name: str) -> tuple[nn.Module, Any]:
    """Causal LM + tokenizer from a hub id, a folder, or builtin:smollm2-135m-instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = parse_source(name, "language")
    if source.kind == "timm" or (source.kind == "builtin" and source.name != "smollm2-135m-instruct"):
        raise ModelError(f"language: {name} is not a language model; use builtin:smollm2-135m-instruct.")
    location: str | Path = source.name
    if source.kind == "builtin":
        from visiontune.core.assets import smollm2_dir

        location = smollm2_dir()
    try:
        return AutoModelForCausalLM.from_pretrained(location), AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"language: {name} cannot be loaded as a causal LM offline ({str(err).splitlines()[0]}); give a local "
            "folder or builtin:smollm2-135m-instruct."
        ) from None


def _prepare_tokenizer(tokenizer: Any, chat_template: str | None, name: str) -> None:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ModelError(f"language: {name} has no chat template; set the recipe key `chat_template` (Jinja).")
    tokenizer.chat_template = flattening_template(template)
