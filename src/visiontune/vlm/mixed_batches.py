"""Records with and without images in one run. A VLM skips its vision tower on a batch without images, so when one
rank's batch has an image and another's has none, the ranks disagree about which parameters take part in the step:

* ZeRO-3: each rank holds a shard of every parameter and a module's forward gathers it from all ranks, so the rank
  with the image waits in the vision tower's gather while the other gathers the language model's layers: both wait
  forever (reproduced on two CPU ranks with a tiny Qwen2-VL; transformers, TRL and DeepSpeed leave it to the user).
* ZeRO-2: the ranks' gradient buckets differ (the vision tower's gradients exist on one rank only) and the first
  reduce fails with gloo's "collective mismatch" (reproduced the same way).
* DDP: the ranks wait for each other in the gradient all-reduce, unless told to look for unused parameters.

`StandIn` makes every forward run the vision path: where a batch brings no image, a stand-in image (one small grey
picture, through the processor's own image processor) goes through the model's own image encoder (vision tower and
projector) and 0 x the sum of its output is added to the language model's input embeddings, so the loss, the logits
and the other gradients are exactly what they were without it, while every vision parameter the real path reaches gets
a zero gradient, which the ranks' reduce averages in as DDP did for unused parameters. Only where several ranks train:
in one process a text-only step leaves the vision path without gradients, and AdamW skips it (with zero gradients it
would still decay those weights).

What makes it hold under ZeRO (an earlier stand-in, its output added to the embeddings, got ZeRO-3 past the forward but
left the gradient reduce-scatters out of step): the stand-in runs where the image features would, between the token
embedding and the language model (a pre-hook on the language model), so each rank gathers the same modules in the same
order in the forward; it encodes only what the forward uses (`pooler_output`: LLaVA's layers after
`vision_feature_layer` get no gradient on either path); and its features join the graph the way real ones do
(combined with the token embeddings right before the language model), so autograd, which runs ready nodes by creation
order, produces the gradients in the same order on every rank and ZeRO's gradient buckets (filled in that order,
reduced whenever `reduce_bucket_size` fills) hold the same parameters at the same offsets. vlm_preference
encodes images before its forward (`preference_forward.pair_logits`), so there the stand-in is encoded at that same
place (`StandIn.encode`); an assembled VLM (vlm_assemble) calls it from its own `embed`, where its image features go.
And it takes nothing from a parameter (see `_vision_path`: under ZeRO-3 that read is itself a collective).
tests/vlm/test_mixed_batches.py checks the order and the unchanged loss in one process, and trains on two ranks under
DDP, ZeRO-2 and ZeRO-3 with one rank's batch an image and the other's text only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STAND_IN_SIZE = 28  # pixels a side: the processors resize it up to their smallest input (Qwen2-VL: 56 x 56)
ATTRIBUTE = "visiontune_stand_in"  # on the base model: the StandIn serving it (vlm_preference's pair_logits asks)


def mixed_images(records: list[Any]) -> bool:
    """Some records have images and some have none."""
    return len({bool(r.images) for r in records}) == 2


class StandIn:
    """Runs the model's vision path on a stand-in image in every forward that has no image of its own (see the
    module docstring); installed by `install_stand_in`."""

    def __init__(self, model: nn.Module, processor: Any, max_pixels: int):
        from PIL import Image

        from visiontune.vlm.collate import VlmCollator

        self.model = model
        self.inputs = VlmCollator(processor, max_pixels).pixels([[Image.new("RGB", (STAND_IN_SIZE,) * 2, "grey")]])
        self.vision, self.language = _parts(model)
        self.ran = False  # the vision path ran in this forward (a real image, or `encode`)
        self.features: list[torch.Tensor] = []  # encoded ahead of the forward by `encode`
        if not hasattr(model, "image_embeds"):  # an assembled VLM's own `embed` asks `zero_for` instead
            self.vision.register_forward_hook(self._vision_ran)
            self.language.register_forward_pre_hook(self._before_language, with_kwargs=True)

    def encode(self, device: torch.device) -> None:
        """The stand-in through the vision path now, added in the next language-model forward (vlm_preference
        encodes a pair batch's images before its forward; the stand-in of a text-only batch must run there too)."""
        self.features = _tensors(self._vision_path(device))
        self.ran = True

    def zero_for(self, embeds: torch.Tensor) -> torch.Tensor:
        """0 x the stand-in's features (encoded ahead by `encode`, else now), in `embeds`' dtype."""
        features, self.features = self.features or _tensors(self._vision_path(embeds.device, embeds.dtype)), []
        self.ran = False
        return (sum(f.float().sum() for f in features) * 0.0).to(embeds.dtype)  # exactly 0: the features are finite

    def _vision_path(self, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        """The stand-in through the model's image encoder, on the batch's `device` (`dtype`: the embeddings', which an
        assembled VLM's `embed` casts pixels to). Device and dtype come from the batch, never from a parameter: under
        ZeRO-3, reading a module's parameter attribute in a forward gathers it from all ranks (DeepSpeed's
        ZeROOrderedDict), a collective that only this rank would enter; one `.weight.dtype` here put the ranks'
        gathers out of step (gloo's "collective mismatch" on two CPU ranks)."""
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        if hasattr(self.model, "image_embeds"):  # an assembled VLM: as its `embed` (or pair_logits) passes pixels
            pixels = inputs["pixel_values"]
            return self.model.image_embeds(pixels if dtype is None else pixels.to(dtype))
        from visiontune.vlm.preference_forward import image_feature_defaults

        out = self.model.get_image_features(**inputs, **image_feature_defaults(self.model), return_dict=True)
        return out.pooler_output  # what the forward puts into the embeddings (LLaVA: from an inner layer, not all)

    def _vision_ran(self, module: nn.Module, args: Any, output: Any) -> None:
        self.ran = True

    def _before_language(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ran, self.ran = self.ran, False
        cache = kwargs.get("past_key_values")
        if getattr(cache, "get_seq_length", lambda: 0)() > 0:  # a generation step after the first: never an image
            return None
        features, self.features = self.features, []
        if ran and not features:  # a real image went in
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError(f"{type(module).__name__} got no inputs_embeds to add the stand-in image's zero to")
        self.features = features
        return args, {**kwargs, "inputs_embeds": embeds + self.zero_for(embeds)}


def keep_ranks_in_step(model: nn.Module, processor: Any, max_pixels: int, records: list[Any]) -> StandIn | None:
    """A `StandIn` for `model` when several ranks train on `records` (with `.images`) that mix images and text only."""
    from visiontune.run.distributed import launched_world_size

    if launched_world_size() < 2 or not mixed_images(records):
        return None
    return install_stand_in(model, processor, max_pixels)


def install_stand_in(model: nn.Module, processor: Any, max_pixels: int) -> StandIn:
    """A `StandIn` for `model` (a transformers VLM or an assembled one; a PEFT wrapper is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stand_in = StandIn(base, processor, max_pixels)
    setattr(base, ATTRIBUTE, stand_in)
    return stand_in


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The vision module whose forward means an image went in, and the language model the embeddings go into."""
    if hasattr(model, "image_embeds"):
        return model.vision, model.language
    inner = model.model
    vision = next(getattr(inner, n) for n in ("visual", "vision_tower", "vision_model") if hasattr(inner, n))
    language = next(getattr(inner, n) for n in ("language_model", "text_model") if hasattr(inner, n))
    return vision, language


def _tensors(features: torch.Tensor | list | tuple) -> list[torch.Tensor]:
    """The image features the forward would use: one tensor, or one per image (Qwen2-VL). Only these: a parameter the
    real path does not reach (LLaVA's layers after `vision_feature_layer`) must get no gradient here either."""
    return [features] if isinstance(features, torch.Tensor) else list(features)
