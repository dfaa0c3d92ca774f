"""One forward over a pair batch with each image encoded once.

A pair batch holds 2B text rows ([chosen; rejected]: the same prompt and images, two answers) but the image inputs
of the B chosen rows only (`PairCollator`). The vision tower and projector run once on those, through the model's
own `get_image_features`, and their output is given twice, as `mm_encoder_outputs`, to the forward over the 2B
rows: transformers 5 takes precomputed image features that way for every family vlm_sft supports (Idefics3 /
SmolVLM, Qwen2-VL, Qwen2.5-VL, LLaVA); an assembled VLM (vlm_assemble) takes them as `image_embeds`. TRL's
DPOTrainer instead encodes each image once per answer.
Why our own code: neither TRL nor transformers shares image features across the two answers of a pair.
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes")
# Set from the config where the model's forward would (LLaVA's get_image_features has no defaults of its own).
_CONFIG_DEFAULTS = ("vision_feature_layer", "vision_feature_select_strategy")


def answer_logps(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, unwrapped: Any = None) -> Any:
    """Summed log-probs of the labelled answers of the 2B rows (`SequenceLogps`). The model returns logits only from
    the position before the earliest answer token on (`logits_to_keep`): the prompt and its image tokens, most of a
    row, never get a [positions x vocabulary] logits tensor."""
    from visiontune.vlm.preference_loss import sequence_logps
    from visiontune.vlm.tokenize import IGNORE

    if "pair_lengths" in inputs:  # one packed row (data.packing)
        text = {k: v for k, v in inputs.items() if k != "pair_lengths"}
        return packed_logps(model, text, labels, inputs["pair_lengths"], unwrapped)
    labelled = (labels != IGNORE).any(0).nonzero()
    start = max(1, int(labelled[0])) if len(labelled) else 1
    logits = pair_logits(model, inputs, unwrapped, keep=labels.shape[1] - start + 1)
    return sequence_logps(logits, labels[:, start - 1 :])


def packed_logps(
    model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, lengths: torch.Tensor, unwrapped: Any = None
) -> Any:
    """`answer_logps` of a packed row ([1, T], records of `lengths`): logits only at the positions that predict an
    answer token (`logits_to_keep` as indices), each token's log-prob summed into its record."""
    from visiontune.vlm.preference_loss import SequenceLogps
    from visiontune.vlm.tokenize import IGNORE

    keep = (labels[0, 1:] != IGNORE).nonzero().squeeze(1)  # [K]: position j predicts label j + 1
    logits = pair_logits(model, inputs, unwrapped, keep=keep)[0].float()  # [K, V]
    targets = labels[0, keep + 1]
    logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(1)  # [K]
    n = len(lengths)
    record = torch.repeat_interleave(torch.arange(n, device=labels.device), lengths.to(labels.device))[keep + 1]
    column = torch.arange(len(keep), device=labels.device)
    per_token = logps.new_zeros(n, len(keep)).index_put((record, column), logps)  # [2B, K], zero off-record
    mask = torch.zeros(n, len(keep), dtype=torch.bool, device=labels.device).index_put(
        (record, column), torch.tensor(True, device=labels.device)
    )
    return SequenceLogps(per_token.sum(-1), mask.sum(-1), per_token, mask)


def pair_logits(
    model: Any, inputs: dict[str, torch.Tensor], unwrapped: Any = None, keep: int | torch.Tensor = 0
) -> torch.Tensor:
    """Logits of the 2B rows of `inputs` (the last `keep` positions, or the positions `keep` lists; 0: all), the
    images of its B chosen rows encoded once. `unwrapped`: the model without its DDP / accelerate wrapper."""
    from visiontune.vlm.mixed_batches import ATTRIBUTE

    images = {k: inputs[k] for k in IMAGE_INPUTS if k in inputs}
    text = {k: v for k, v in inputs.items() if k not in IMAGE_INPUTS}
    base = unwrapped if unwrapped is not None else model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # PEFT: adapters stay in place

    def run(forward: Any) -> torch.Tensor:
        if not images and getattr(base, ATTRIBUTE, None) is not None:
            getattr(base, ATTRIBUTE).encode(text["input_ids"].device)  # mixed data: a stand-in (mixed_batches.py)
        if images:
            if hasattr(base, "image_embeds"):  # an assembled VLM (vlm/assembled.py): projected image tokens
                text["image_embeds"] = twice(base.image_embeds(images["pixel_values"]))
                return forward(**text, use_cache=False, logits_to_keep=keep).logits
            encoded = base.get_image_features(**images, **image_feature_defaults(base), return_dict=True)
            encoded.pooler_output = twice(encoded.pooler_output)
            text["mm_encoder_outputs"] = {"image": encoded}
            if "image_grid_thw" in images:  # Qwen's 3-D positions need every row's image grid
                text["image_grid_thw"] = torch.cat([images["image_grid_thw"]] * 2)
        return forward(**text, use_cache=False, logits_to_keep=keep).logits

    return within_forward(model, run)


def within_forward(model: Any, run: Any) -> torch.Tensor:
    """`run(forward)` (the image encoding, then `forward`, the model's forward) inside one call of an FSDP2 `model`.

    FSDP2 gathers a unit's weights in its forward hooks and sets up the backward's gathers from there: the root
    unit's weights (the vision embeddings and projector of a model sharded per decoder layer, LoRA's adapters)
    are whole only inside the root's call, and a vision layer called before it would make itself the root. So the
    encoding must run inside the root's call, which the model's own forward does not offer (it takes the features
    precomputed, not once for two rows); for that one call the instance's `forward` is `run`, and `run` calls the
    class's forward directly (calling `model` again would run the hooks twice). Elsewhere `run(model)` as is."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return run(model)
    plain = type(model).forward.__get__(model)  # the class's forward: no hooks
    model.forward = lambda: run(plain)  # nn.Module.__call__ runs the hooks around self.forward
    try:
        return model()
    finally:
        del model.forward


def image_feature_defaults(model: Any) -> dict[str, Any]:
    """The arguments of `get_image_features` the model's forward takes from its config."""
    return {k: getattr(model.config, k) for k in _CONFIG_DEFAULTS if hasattr(model.config, k)}


def twice(features: Any) -> Any:
    """Image features of the chosen rows, then the same for the rejected rows (a tensor or a per-image list)."""
    if isinstance(features, torch.Tensor):
        return torch.cat([features, features])
    return type(features)(list(features) * 2) if isinstance(features, tuple) else list(features) * 2
