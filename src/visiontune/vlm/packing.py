"""Padding-free batches for `vlm_sft` (`data.packing: true`): the records of a batch become one row, nothing padded.

Each record keeps its own positions (0, 1, ... from its first token) and, for Qwen2-VL / Qwen2.5-VL, its own 3-D
rotary positions computed by the model's `get_rope_index` over that record alone (prefixed with the text positions,
the [4, 1, T] form those models accept for packed rows). No attention mask is passed, so transformers' masking
builds a block-diagonal causal mask from the positions (`find_packed_sequence_indices`): attention never crosses a
record, under SDPA on CPU as under flash attention. The first label of every record is -100, so no record is
trained to predict the next one's first token. The loss is unchanged: the same label tokens, averaged the same way.

Why our own collator: transformers' `DataCollatorWithFlattening` flattens text only; it knows neither images nor
M-RoPE positions. `use_cache: false` goes with every batch because a cache turns the packed-mask detection off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from visiontune.vlm.collate import VlmCollator
from visiontune.vlm.conversations import load_images
from visiontune.vlm.tokenize import IGNORE, cap_pixels


def rope_index_of(model: Any) -> Callable | None:
    """The model's M-RoPE position function (Qwen2-VL family), through PEFT wrappers; None for 1-D rope families."""
    return next((m.get_rope_index for m in model.modules() if hasattr(m, "get_rope_index")), None)


class PackedCollator(VlmCollator):
    def __init__(self, processor: Any, max_pixels: int, rope_index: Callable | None = None):
        super().__init__(processor, max_pixels)
        self.rope_index = rope_index

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        ids = [torch.tensor(i["input_ids"]) for i in items]
        labels = [torch.tensor([IGNORE, *i["labels"][1:]]) for i in items]
        batch: dict[str, Any] = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None]}
        for key in items[0]["extra"]:
            batch[key] = torch.cat([torch.tensor(i["extra"][key]) for i in items])[None]
        images = [[cap_pixels(im, self.max_pixels) for im in load_images(i["conv"])] for i in items]
        batch.update(self.pixels([[im for per in images for im in per]]))  # one row: one list of images
        positions = torch.cat([torch.arange(len(i)) for i in ids])[None]
        if self.rope_index is not None and "image_grid_thw" in batch:
            positions = torch.cat([positions[None], self._rope(items, images, batch["image_grid_thw"])], dim=0)
        batch["position_ids"] = positions
        batch["use_cache"] = False
        self.total += int(batch["input_ids"].shape[1])  # no padding: padding_fraction() stays 0
        return batch

    def _rope(self, items: list[dict], images: list[list], grid: torch.Tensor) -> torch.Tensor:
        """[3, 1, T]: each record's M-RoPE positions as the model computes them for that record alone."""
        parts, first = [], 0
        for item, own in zip(items, images, strict=True):
            rows = grid[first : first + len(own)] if own else None
            first += len(own)
            ids = torch.tensor(item["input_ids"])[None]
            types = torch.tensor(item["extra"].get("mm_token_type_ids", [0] * ids.shape[1]))[None]
            position, _ = self.rope_index(ids, types, rows)
            parts.append(position)
        return torch.cat(parts, dim=-1)
