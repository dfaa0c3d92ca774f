"""Tokenise VLM conversations once, with labels on the assistant's words only, and check every record fits.

Why our own code: TRL 1.16 trains on every token by default and its `assistant_only_loss` needs generation markers
in the chat template. Here the trained spans come from the template itself, for any family: the text rendered for
`messages[:k]` + generation prompt is a prefix of the full text, and the text rendered through assistant turn k is
a longer prefix; the characters between the two are the answer plus its end-of-turn marker. Token boundaries are
found by tokenising those prefixes with their images, so image tokens expand exactly as in the full record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from visiontune.core.identity import file_digest, memory_digest
from visiontune.vlm.conversations import Conversation, load_images, to_messages

IGNORE = -100
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes")


class BadRecord(Exception):
    """A record that cannot be trained on; the message says why and how to fix it."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    extra: dict[str, list[int]] = field(default_factory=dict)  # token-aligned processor outputs (mm_token_type_ids)
    ref: str = ""
    index: int = 0
    cut: int = 0  # tokens cut off at data.max_length
    lost: int = 0  # of those, answer (trained) tokens: what truncation took from training

    def __len__(self) -> int:
        return len(self.input_ids)


def cap_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale (keeping the aspect ratio) so width*height <= max_pixels: the default guard against OOM."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = (max_pixels / (w * h)) ** 0.5
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)


def tokenize(processor: Any, conv: Conversation, max_length: int, max_pixels: int, train_on: str) -> Tokenized:
    images = [cap_pixels(im, max_pixels) for im in load_images(conv)]
    messages = to_messages(conv)
    full_text = render(processor, messages)
    full = _encode(processor, full_text, images)
    ids = full["input_ids"]
    extra = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask") and _token_aligned(v, ids)}
    if train_on == "all":
        record = Tokenized(ids, list(ids), extra, conv.ref)
    else:
        spans = _assistant_spans(processor, messages, full_text, images, ids)
        record = _with_end_of_turn(processor, Tokenized(ids, _labels(ids, spans), extra, conv.ref), spans)
    return _fit(processor, record, max_length)


def render(processor: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(
    processor: Any, messages: list[dict], full_text: str, images: list, ids: list[int]
) -> list[tuple[int, int]]:
    spans = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start = _boundary(
                processor, render(processor, messages[:k], generation_prompt=True), full_text, images, ids
            )
            spans.append((start, _boundary(processor, render(processor, messages[: k + 1]), full_text, images, ids)))
    return spans


def _labels(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return labels


def _with_end_of_turn(processor: Any, record: Tokenized, spans: list[tuple[int, int]]) -> Tokenized:
    """Templates that close an answer with no special token (llava-1.5) would teach a model never to stop: append
    the tokenizer's eos to each such answer, trained, as the original LLaVA training did."""
    tok = processor.tokenizer
    special = set(tok.all_special_ids)
    ids, labels = list(record.input_ids), list(record.labels)
    extra = {k: list(v) for k, v in record.extra.items()}
    for start, end in reversed(spans):
        if tok.eos_token_id is None or any(t in special for t in ids[start:end]):
            continue
        ids.insert(end, tok.eos_token_id)
        labels.insert(end, tok.eos_token_id)
        for values in extra.values():
            values.insert(end, 0)
    return Tokenized(ids, labels, extra, record.ref)


def _boundary(processor: Any, prefix: str, full_text: str, images: list, ids: list[int]) -> int:
    """Token index where `prefix` ends inside the full record."""
    if not full_text.startswith(prefix):
        raise BadRecord(
            "the chat template renders a conversation prefix differently from the full conversation, so the "
            "answer spans cannot be located; set data.train_on=all or give a prefix-stable `chat_template`"
        )
    n_images = prefix.count(_image_marker(processor))
    prefix_ids = _encode(processor, prefix, images[:n_images])["input_ids"]
    n = len(prefix_ids)
    while n > 0 and ids[:n] != prefix_ids[:n]:  # a merge across the boundary: back off to where they agree
        n -= 1
    return n


def _fit(processor: Any, record: Tokenized, max_length: int) -> Tokenized:
    """Truncate text after the last image, never inside image tokens; refuse what cannot fit."""
    if len(record) > max_length:
        image_id = _image_token_id(processor)
        last_image = max((i for i, t in enumerate(record.input_ids) if t == image_id), default=-1)
        if last_image >= max_length:
            raise BadRecord(
                f"needs {last_image + 1} tokens to keep its images whole but data.max_length is {max_length}; "
                "raise data.max_length or lower data.max_image_pixels"
            )
        record = Tokenized(
            record.input_ids[:max_length],
            record.labels[:max_length],
            {k: v[:max_length] for k, v in record.extra.items()},
            record.ref,
            cut=len(record) - max_length,
            lost=sum(label != IGNORE for label in record.labels[max_length:]),
        )
    if all(label == IGNORE for label in record.labels):
        raise BadRecord(f"has no assistant tokens within data.max_length={max_length}; raise it or shorten the prompt")
    return record


def _encode(processor: Any, text: str, images: list) -> dict[str, list[int]]:
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = [images] if nested_images(processor) else images
    out = processor(**kwargs)
    return {k: v[0].tolist() for k, v in out.items() if k not in PIXEL_KEYS and torch.is_tensor(v) and v.ndim == 2}


def _token_aligned(values: list[int], ids: list[int]) -> bool:
    return isinstance(values, list) and len(values) == len(ids)


def nested_images(processor: Any) -> bool:
    """Idefics3/SmolVLM processors take one list of images per text."""
    return type(processor).__name__.startswith(("Idefics", "SmolVLM"))


def _image_marker(processor: Any) -> str:
    """The string the chat template writes for each image (before the processor expands it)."""
    name = type(processor).__name__
    if name.startswith("Qwen2"):
        return "<|vision_start|>"
    return getattr(processor, "image_token", "<image>")


def _image_token_id(processor: Any) -> int:
    token = getattr(processor, "image_token", None) or "<image>"
    return processor.tokenizer.convert_tokens_to_ids(token)


def cache_key(model: str, processor: Any, convs: list[Conversation], settings: dict) -> str:
    """Changes with anything that changes the tokenised result: the records themselves and their order (turns, image
    identities), the tokenisation `settings`, the processor and tokenizer, the model and the library version.
    The data file's path is left out so the same records read from elsewhere share one cache."""
    import transformers

    h = hashlib.sha256(CACHE_FORMAT.encode())
    header = {"model": model, "settings": settings, "transformers": transformers.__version__}
    h.update(json.dumps(header, sort_keys=True, default=repr).encode())
    h.update(_processor_fingerprint(processor).encode())
    for path in _processor_files(model):
        if path.is_file():
            h.update(f"{path.name}:{file_digest(path)}".encode())
    for conv in convs:  # each record is one self-delimiting JSON value, so the stream is unambiguous
        record = [[[t.role, t.text] for t in conv.turns], [_image_identity(s) for s in conv.images]]
        h.update(json.dumps(record).encode())
    return h.hexdigest()[:32]


CACHE_FORMAT = "visiontune-tokenized-3"  # bump when the stored layout or the tokenisation rules change
_IMAGE_TOKEN_ATTRS = ("image_token", "num_image_tokens", "image_seq_len", "patch_size", "num_additional_image_tokens")


def _processor_fingerprint(processor: Any) -> str:
    """The processor's chat template, image-token settings, image processor and full tokenizer, as one string."""
    tok = getattr(processor, "tokenizer", processor)
    backend = getattr(tok, "backend_tokenizer", None)
    parts = {
        "template": getattr(processor, "chat_template", None),
        "tokenizer_template": getattr(tok, "chat_template", None),
        "image_tokens": {a: getattr(processor, a, None) for a in _IMAGE_TOKEN_ATTRS},
        "processor": _describe(processor),
        "image_processor": _describe(getattr(processor, "image_processor", None)),
        # vocabulary, merges, normalizer and added tokens: everything the text encodes with
        "tokenizer": backend.to_str() if backend is not None else sorted(tok.get_vocab().items()),
        "specials": getattr(tok, "special_tokens_map", None),
    }
    return json.dumps(parts, sort_keys=True, default=repr)


def _describe(obj: Any) -> Any:
    """A transformers processor's own serialisation, or a plain `config` dict (visiontune's own processors)."""
    to_json = getattr(obj, "to_json_string", None)
    return to_json() if callable(to_json) else getattr(obj, "config", None)


def _image_identity(source: Any) -> str:
    """An image by its content: a file by a hash of its bytes (not size + mtime, which a replaced image can keep:
    stale tokens then fail with "Image features and image tokens do not match"; ~0.15 ms per 60 KB JPEG), so moved
    data keeps its cache too; in-memory images by a hash of their bytes."""
    if isinstance(source, bytes | Image.Image):
        return "data:" + memory_digest(source)
    path = Path(source).resolve()
    try:
        return "file:" + file_digest(path)
    except OSError:  # a missing file still keys by its path; tokenising reports it
        return f"file:{path}:missing"


def _processor_files(model: str) -> list[Path]:
    folder = Path(model)
    if not folder.is_dir():
        return []
    names = (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "chat_template.jinja",
        "processor_config.json",
        "preprocessor_config.json",
    )
    return [folder / n for n in names]


def truncation(records: list[Tokenized]) -> dict[str, int]:
    """How many records data.max_length cut, and how many answer tokens they lost (for data_report.json)."""
    return {"records": sum(r.cut > 0 for r in records), "answer_tokens_lost": sum(r.lost for r in records)}


def say_truncation(counts: dict[str, dict[str, int]], max_length: int) -> None:
    """One line when data.max_length cut answers: training on half an answer teaches half answers."""
    from visiontune.core.check import say

    cut = {role: c for role, c in counts.items() if c["records"]}
    if cut:
        parts = ", ".join(
            f"{c['records']} {role} record(s) losing {c['answer_tokens_lost']} answer token(s)"
            for role, c in cut.items()
        )
        say(f"data.max_length={max_length} cut {parts}; raise data.max_length to train on whole answers.")
