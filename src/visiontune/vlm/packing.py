"""Padding-free batches (`data.packing: true`) for `vlm_sft`, `vlm_assemble` and `vlm_preference`: the records of a
batch become one row, nothing padded.

Each record keeps its own positions (0, 1, ... from its first token) and, for Qwen2-VL / Qwen2.5-VL, its own 3-D
rotary positions computed by the model's `get_rope_index` over that record alone (prefixed with the text positions,
the [4, 1, T] form those models accept for packed rows). No attention mask is passed, so transformers' masking
builds a block-diagonal causal mask from the positions (`find_packed_sequence_indices`): attention never crosses a
record, under SDPA on CPU as under flash attention (vlm/packed_attention.py runs attention per record instead of over
the whole row). The first label of every record is -100, so no record is trained to predict the next one's first
token. The loss is unchanged: the same label tokens, averaged the same way.

Preference pairs (`PackedPairCollator`): the row holds the B chosen records, then the B rejected ones (the order of
the padded [chosen; rejected] batch), with the image inputs of the chosen records only (vlm/preference_forward.py
encodes them once for both) and `pair_lengths` [2B], from which the answer log-probs are summed per record.

Why our own collator: transformers' `DataCollatorWithFlattening` flattens text only; it knows neither images nor
M-RoPE positions. `use_cache: false` goes with every SFT batch because a cache turns the packed-mask detection off.
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


def records_in(position_ids: torch.Tensor) -> int:
    """How many records a packed row holds: where its text positions restart at 0 ([1, T] or [4, 1, T])."""
    return int((position_ids.reshape(-1, position_ids.shape[-1])[0] == 0).sum())


class PackedCollator(VlmCollator):
    def __init__(self, processor: Any, max_pixels: int, rope_index: Callable | None = None):
        super().__init__(processor, max_pixels)
        self.rope_index = rope_index

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        images = [self.images_of(i) for i in items]
        batch = self.pack(items)
        batch.update(self.pixels([[im for per in images for im in per]]))  # one row: one list of images
        batch["position_ids"] = self.positions(items, images, batch.get("image_grid_thw"))
        batch["use_cache"] = False
        return batch

    def images_of(self, item: dict) -> list:
        return [cap_pixels(im, self.max_pixels) for im in load_images(item["conv"])]

    def pack(self, items: list[dict]) -> dict[str, Any]:
        """Token ids, labels (the first of each record -100) and per-token extras of `items` as one [1, T] row."""
        labels = [torch.tensor([IGNORE, *i["labels"][1:]]) for i in items]
        batch: dict[str, Any] = {
            "input_ids": torch.cat([torch.tensor(i["input_ids"]) for i in items])[None],
            "labels": torch.cat(labels)[None],
        }
        for key in items[0]["extra"]:
            batch[key] = torch.cat([torch.tensor(i["extra"][key]) for i in items])[None]
        self.total += int(batch["input_ids"].shape[1])  # no padding: padding_fraction() stays 0
        return batch

    def positions(self, items: list[dict], images: list[list], grid: torch.Tensor | None) -> torch.Tensor:
        """[1, T] positions restarting at each record; with M-RoPE, [4, 1, T]: text positions + the 3-D ones."""
        positions = torch.cat([torch.arange(len(i["input_ids"])) for i in items])[None]
        if self.rope_index is not None and grid is not None:
            positions = torch.cat([positions[None], self._rope(items, images, grid)], dim=0)
        return positions

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


class PackedPairCollator(PackedCollator):
    """Preference pairs as one row: [chosen records; rejected records], the chosen records' image inputs, each
    record's length (`pair_lengths` [2B]) and, when computed before training, `ref_logps` [2B]."""

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        rows = [i["chosen"] for i in items] + [i["rejected"] for i in items]
        images = [self.images_of(i["chosen"]) for i in items]  # the rejected answers share them
        batch = self.pack(rows)
        batch.update(self.pixels([[im for per in images for im in per]]))
        grid = batch.get("image_grid_thw")
        batch["position_ids"] = self.positions(rows, images * 2, None if grid is None else torch.cat([grid, grid]))
        batch["pair_lengths"] = torch.tensor([len(r["input_ids"]) for r in rows])
        if "reference" in items[0]:
            ref = torch.stack([i["reference"] for i in items])
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch
