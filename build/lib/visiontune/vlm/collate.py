"""Batches of tokenised VLM records: right padding, labels padded with -100, images run through the processor's
image processor (the same one that sized the image tokens), and a running count of padding."""

from __future__ import annotations

from typing import Any

import torch

from visiontune.vlm.conversations import load_images
from visiontune.vlm.tokenize import IGNORE, cap_pixels, nested_images


class VlmCollator:
    def __init__(self, processor: Any, max_pixels: int):
        self.processor, self.max_pixels = processor, max_pixels
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.padded = self.total = 0

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        batch = {
            "input_ids": _pad([i["input_ids"] for i in items], width, self.pad_id),
            "labels": _pad([i["labels"] for i in items], width, IGNORE),
            "attention_mask": _pad([[1] * len(i["input_ids"]) for i in items], width, 0),
        }
        for key in items[0]["extra"]:
            batch[key] = _pad([i["extra"][key] for i in items], width, 0)
        self.padded += int((batch["attention_mask"] == 0).sum())
        self.total += batch["attention_mask"].numel()
        batch.update(self.pixels([[cap_pixels(im, self.max_pixels) for im in load_images(i["conv"])] for i in items]))
        return batch

    def pixels(self, images: list[list]) -> dict[str, torch.Tensor]:
        if not any(images):
            return {}
        flat = images if nested_images(self.processor) else [im for per in images for im in per]
        out = self.processor.image_processor(images=flat, return_tensors="pt")
        return {k: v for k, v in out.items() if torch.is_tensor(v)}

    def padding_fraction(self) -> float:
        return self.padded / self.total if self.total else 0.0


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)
