"""Tiny random-weight vision-language models of four real families, saved with `save_pretrained` so they load through
`AutoModelForImageTextToText` + `AutoProcessor` exactly like hub checkpoints — fully offline, in a few seconds.

Each family keeps what loss masking and collation depend on: the real processor class, the real tokenizer class
(trained here on a small English corpus), the family's special tokens and the chat template its hub checkpoint ships.
Only the sizes are tiny: 32-56 px images, 2-layer vision and text towers, a ~512-token vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

FAMILIES = ("idefics3", "qwen2_vl", "qwen2_5_vl", "llava")
VOCAB_SIZE = 512
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
# The tiny ViT tower (32 px, 8 px patches, width 32) of the CLIP-style fixtures: Idefics3 and LLaVA here, and the
# CLIP/SigLIP dual encoders of testing/fixtures.py.
TINY_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}

# Chat templates, verbatim as the hub checkpoints ship them (only split into Python literals to fit 120 columns).
# HuggingFaceTB/SmolVLM-Instruct chat_template.json (Idefics3 architecture).
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Qwen/Qwen2-VL-7B-Instruct chat_template.json; Qwen/Qwen2.5-VL-*-Instruct ship the same string.
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# llava-hf/llava-1.5-7b-hf chat_template.json (Vicuna style, no end-of-turn token: see `tiny_llava`).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN_VL_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IDEFICS3_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]

_CORPUS = """A photo of a small red cat sitting on a wooden table next to a window.
The image shows two dogs running across a green field on a sunny afternoon.
Describe this image in one short sentence. What colour is the car in the picture?
There is a blue bicycle leaning against a brick wall, and a yellow door behind it.
Question: how many birds are on the wire? Answer: there are three birds on the wire.
The handwritten digit in the image is a seven; it is written with a thick black pen.
A plate of pasta with tomato sauce, fresh basil and grated cheese on top.
Is the invoice total above 500 dollars? Answer in JSON with the keys total and currency.
The chart compares sales in 2021, 2022 and 2023: revenue grew by 12% every year.
You are a helpful assistant. Look at the picture carefully before you answer the question.
The man in the striped shirt is holding an umbrella while he waits for the bus.
Snow covers the mountains in the background, and a lake reflects the evening sky.
What is written on the sign? The sign says: STOP, do not enter (private road).
An aerial view of a city at night with bright streets, tall buildings and a river.
The x-ray shows a broken bone in the left arm; the doctor points at the fracture.
Please count the apples, oranges and bananas in the basket and list them.
She is reading a book under a tree while her children play football nearby.
The screenshot shows a settings menu with options for sound, display and network.
Is this a cat or a dog? It is a dog. Which animal is bigger? The horse is bigger.
A close-up of a green leaf with drops of water after the rain, in soft morning light.
0 1 2 3 4 5 6 7 8 9 10 100 1000 #1 @home $5 &more *star +plus =equal [box] {json} <tag> ~ ^ | \\ / _ ` ' " ; ! ?
"""


def corpus() -> list[str]:
    """The built-in English training corpus: captions, questions and answers, digits and punctuation."""
    return _CORPUS.splitlines()


def _train(base, specials: dict[str, Any], vocab_size: int = VOCAB_SIZE):
    """Train `base`'s own class/normaliser/pre-tokenizer on the corpus, then append the family's special tokens
    after the learned vocabulary (where hub checkpoints have them too)."""
    tok = base.train_new_from_iterator([corpus()], vocab_size=vocab_size, show_progress=False)
    tok.add_special_tokens(specials)
    return tok


def _llama_tokenizer(specials: dict[str, Any]):
    """LlamaTokenizer with the real layout: <unk> <s> </s>, then the 256 `<0xNN>` byte-fallback tokens, then BPE.
    A plain `train_new_from_iterator` has no byte tokens, so characters outside the corpus would vanish silently."""
    import json

    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    base = LlamaTokenizer()
    # Learn merges word by word, as SentencePiece does; with Llama's unsplit Metaspace, BPE would learn pieces that
    # straddle spaces ("d▁c"). The rebuilt tokenizer below gets Llama's own pre-tokenizer back.
    base.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trained = base.train_new_from_iterator([corpus()], vocab_size=VOCAB_SIZE - 256, show_progress=False)
    model = json.loads(trained.backend_tokenizer.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    vocab = [*learned[:3], *[f"<0x{b:02X}>" for b in range(256)], *learned[3:]]
    tok = LlamaTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m) for m in model["merges"]], add_bos_token=True
    )
    tok.add_special_tokens(specials)
    return tok


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _text_config(tok, **extra) -> dict[str, Any]:
    """A 2-layer text tower whose vocabulary and special ids all come from the trained tokenizer."""
    return {
        **TEXT,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **extra,
    }


def _save(model, processor, out: Path, eos: list[int]) -> Path:
    """Save weights, generation config and processor; generation stops on every end-of-turn id of the family."""
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_idefics3(out: Path) -> Path:
    """SmolVLM-Instruct layout: SmolLM (GPT2Tokenizer, byte-level BPE) + Idefics3 (SigLIP-like) vision, no splitting.
    One 32-px image -> (32/8)^2 / 2^2 = 4 `<image>` tokens."""
    from transformers import (
        GPT2Tokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tok = _train(
        GPT2Tokenizer(),
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<end_of_utterance>",
            "pad_token": "<|im_end|>",
            "additional_special_tokens": IDEFICS3_SPECIALS,
        },
    )
    tok.chat_template = IDEFICS3_TEMPLATE
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
    )
    processor = Idefics3Processor(image_processor, tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        vision_config=TINY_VISION,
        text_config=_text_config(tok),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    return _save(model, processor, out, _ids(tok, "<end_of_utterance>", "<|im_end|>"))


def _qwen_parts(tok_extra: list[str]):
    """Tokenizer + processor shared by Qwen2-VL and Qwen2.5-VL (same tokenizer family and template)."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = _train(
        Qwen2Tokenizer(),
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": QWEN_VL_SPECIALS + tok_extra,
        },
    )
    tok.chat_template = QWEN_VL_TEMPLATE
    # 56*56 is the real min_pixels; a 112*112 cap keeps images at 4..16 tokens (patch 14, 2x2 merge).
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    processor = Qwen2VLProcessor(
        Qwen2VLImageProcessor(**pixels), tok, Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_VL_TEMPLATE
    )
    return tok, processor


def _qwen_ids(tok) -> dict[str, int]:
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {key: tok.convert_tokens_to_ids(t) for key, t in names.items()}


def _qwen_text(tok) -> dict[str, Any]:
    # head_dim 16 -> 8 rotary frequencies split over (time, height, width) for M-RoPE.
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    return _text_config(tok, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), rope_parameters=rope)


def tiny_qwen2_vl(out: Path) -> Path:
    """Qwen2-VL: Qwen2Tokenizer (byte-level BPE) + ViT with 2x2 patch merger; vision output = text hidden size."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok, processor = _qwen_parts([])
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": TEXT["hidden_size"],
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    model = Qwen2VLForConditionalGeneration(config)
    return _save(model, processor, out, _ids(tok, "<|im_end|>", "<|endoftext|>"))


def tiny_qwen2_5_vl(out: Path) -> Path:
    """Qwen2.5-VL: as Qwen2-VL plus the 2.5 tool-call / FIM tokens; window attention with one full-attention block."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    extra = [
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ]
    tok, qwen2 = _qwen_parts(extra)
    processor = Qwen2_5_VLProcessor(qwen2.image_processor, tok, qwen2.video_processor, chat_template=QWEN_VL_TEMPLATE)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": TEXT["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _save(model, processor, out, _ids(tok, "<|im_end|>", "<|endoftext|>"))


def tiny_llava(out: Path) -> Path:
    """llava-1.5 layout: Llama tokenizer (+`<image>`, `<pad>`) + CLIP ViT (32 px, patch 8) + MLP projector + Llama.
    'default' feature selection drops CLIP's CLS token: 16 `<image>` tokens per image. The template ends an
    assistant turn with a space only; the checkpoints were trained with `</s>` after answers, which is the eos."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _llama_tokenizer({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    tok.chat_template = LLAVA_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config={**TINY_VISION, "projection_dim": 32},
        text_config=_text_config(tok),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        pad_token_id=tok.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config)
    return _save(model, processor, out, [tok.eos_token_id])


_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "idefics3": tiny_idefics3,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "llava": tiny_llava,
}


def tiny_vlm(family: str, out: Path) -> Path:
    """Build and save one tiny VLM of `family` (one of FAMILIES) to `out`; same seed, same weights."""
    import torch

    if family not in _BUILDERS:
        raise ValueError(f"unknown VLM family {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    return _BUILDERS[family](out)


def write_all_vlms(out: Path) -> dict[str, Path]:
    return {family: tiny_vlm(family, out / family) for family in FAMILIES}


def write_all_lms(out: Path) -> dict[str, Path]:
    """Every tiny causal LM (the `language:` of vlm_assemble), keyed `lm-FAMILY`."""
    return {f"lm-{family}": tiny_causal_lm(family, out / family) for family in LM_FAMILIES}


# Qwen/Qwen2.5-0.5B-Instruct's template, reduced to the ChatML turns (no tool calls): text-only LMs take strings.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LM_FAMILIES = ("qwen2", "llama")


def tiny_causal_lm(family: str, out: Path) -> Path:
    """A 2-layer text-only causal LM + tokenizer with a ChatML template: the `language:` of vlm_assemble tests."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Tokenizer

    if family not in LM_FAMILIES:
        raise ValueError(f"unknown LM family {family!r}; choose one of {', '.join(LM_FAMILIES)}")
    specials = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    tok = _train(Qwen2Tokenizer(), specials) if family == "qwen2" else _llama_tokenizer(specials)
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **_text_config(tok), tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = [tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
