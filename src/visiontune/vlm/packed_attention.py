"""Attention over a packed row one record at a time (`data.packing` with SDPA): cost sum(L_i^2), not T^2.

With no attention mask and positions that restart per record, transformers builds a block-diagonal [T, T] mask and
SDPA computes every query against every key of the row, masked entries included (on CPU, and on GPUs without flash
attention's variable-length kernel). This function, registered with transformers' `AttentionInterface` (and SDPA's
own mask builder under the same name in `AttentionMaskInterface`), finds the records where the text positions
restart at 0 and runs SDPA per record with `is_causal` and no mask — what flash attention's varlen kernel does.
Anything else (padded batches, generation with a cache, bidirectional vision encoders) goes to transformers'
`sdpa_attention_forward` unchanged.

Why our own code: transformers' varlen paths are the flash-attention kernels (CUDA only); its SDPA path has none.
"""

from __future__ import annotations

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
    starts = record_starts(kwargs.get("position_ids"), query, key) if causal else None
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
    """Where the records of a packed row begin (text positions back to 0), or None when this is not a packed row:
    several rows, a cache (queries shorter than keys), or positions that never restart."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    text = position_ids.reshape(-1, position_ids.shape[-1])[0]  # [T]: [1, T], or the text row of [4, 1, T]
    if text.shape[0] != query.shape[2] or int(text[0]) != 0:
        return None
    starts = (text == 0).nonzero().squeeze(1).tolist()
    return starts if len(starts) > 1 else None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches still need SDPA's masks


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
