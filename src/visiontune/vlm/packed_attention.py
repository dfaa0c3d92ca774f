"""Attention over a packed row one record at a time (`data.packing` with SDPA): cost sum(L_i^2), not T^2.

With no attention mask and positions that restart per record, transformers builds a block-diagonal [T, T] mask and
SDPA computes every query against every key of the row, masked entries included (on CPU, and on GPUs without flash
attention's variable-length kernel). This function, registered with transformers' `AttentionInterface` (and a mask
builder under the same name in `AttentionMaskInterface`), finds the records where the text positions restart and
runs SDPA per record with `is_causal` and no mask — what flash attention's varlen kernel does.
Anything else (padded batches, generation with a cache, sliding-window layers, bidirectional vision encoders) goes
to transformers' `sdpa_attention_forward` unchanged.

Per forward, not per layer: the record starts are found once for the `position_ids` tensor every layer receives
(remembered through a weak reference, so nothing outlives the forward), and the mask builder registered under our
name (`packed_causal_mask`) returns no mask for a row without padding or cache — the T x T block-diagonal mask that
`sdpa_mask` would build is never read by the per-record path, and a single unpadded row needs none under
`is_causal`. Records of a row are attended one SDPA call each: padding them into one [R, H, L_max, D] batch was
measured slower on CPU for rows of unequal lengths (copies in and out, and Σ L_max^2 instead of Σ L_i^2).

Why our own code: transformers' varlen paths are the flash-attention kernels (CUDA only); its SDPA path has none.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

NAME = "visiontune_packed_sdpa"


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sliding = kwargs.get("sliding_window") is not None  # per-record is_causal would ignore the window
    starts = _starts_once(kwargs.get("position_ids"), query, key) if causal and not sliding else None
    if starts is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    bounds = [*starts, query.shape[2]]
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=gqa,
        )
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None  # [1, T, H, D], as transformers' SDPA returns


def record_starts(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[int] | None:
    """Where the records of a packed row begin, or None when this is not a packed row: several rows, a cache
    (queries shorter than keys), or positions that never restart. A record starts wherever the text position does
    not follow the previous one — transformers' own test for packed rows (`find_packed_sequence_indices`), so every
    row it would mask block-diagonally is attended per record here."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    text = position_ids.reshape(-1, position_ids.shape[-1])[0]  # [T]: [1, T], or the text row of [4, 1, T]
    if text.shape[0] != query.shape[2]:
        return None
    starts = [0, *((text[1:] - text[:-1]) != 1).nonzero().squeeze(1).add(1).tolist()]
    return starts if len(starts) > 1 else None


_last: tuple[Any, tuple, list[int] | None] = (None, (), None)  # (weakref to position_ids, shapes, its starts)


def _starts_once(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[int] | None:
    """`record_starts`, computed once for the `position_ids` tensor every layer of a forward receives."""
    global _last
    if position_ids is None:
        return record_starts(None, query, key)
    shapes = (position_ids._version, query.shape[0], query.shape[2], key.shape[2])
    ref, seen, starts = _last
    if ref is not None and ref() is position_ids and seen == shapes:
        return starts
    starts = record_starts(position_ids, query, key)
    _last = (weakref.ref(position_ids), shapes, starts)
    return starts


def packed_causal_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> torch.Tensor | None:
    """No mask for one unpadded row without a cache under a plain causal pattern (a packed row is then attended per
    record, a single record with `is_causal`); transformers' `sdpa_mask` for everything else (padding, a cache, a
    sliding window or chunk, custom and/or patterns, bidirectional masks)."""
    from transformers.masking_utils import sdpa_mask

    plain = attention_mask is None and local_size is None and not use_vmap
    plain = plain and not kwargs.get("allow_is_bidirectional_skip", False)
    if plain and batch_size == 1 and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        use_vmap=use_vmap,
        **kwargs,
    )


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, packed_causal_mask)  # padded batches still get SDPA's masks


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch the language model's SDPA attention to `packed_sdpa` (vision encoders keep theirs); False when it does
    not run SDPA (flash attention handles packed rows itself; eager is left alone)."""
    from transformers import PreTrainedModel

    top = next((m for m in model.modules() if isinstance(m, PreTrainedModel) and _has_lm_head(m)), None)
    if top is None:
        return False
    text = getattr(top.config, "text_config", None)
    if (text if text is not None else top.config)._attn_implementation != "sdpa":
        return False
    register()
    top.set_attn_implementation({"text_config": NAME} if text is not None else NAME)
    return True


def _has_lm_head(model: torch.nn.Module) -> bool:
    """The VLM or causal LM itself (also inside PEFT or an assembled model), not a vision tower it holds."""
    return getattr(model.config, "text_config", None) is not None or model.get_output_embeddings() is not None
