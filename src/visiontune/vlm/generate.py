"""Evaluate a VLM by generation: greedy answers to every conversation's last user turn, scored against the
reference answer with the metrics of evaluate/generation.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visiontune.vlm.conversations import IMAGE_TOKEN, Conversation, load_images, to_messages
from visiontune.vlm.tokenize import _nested_images, cap_pixels, render


def generation_report(
    model: Any, processor: Any, convs: list[Conversation], metrics: list[str], max_new_tokens: int, max_pixels: int
) -> dict:
    from visiontune.vlm.generation_metrics import compute_metrics

    samples = [answer(model, processor, conv, max_new_tokens, max_pixels) for conv in convs]
    scores = compute_metrics(metrics, [s["prediction"] for s in samples], [[s["reference"]] for s in samples])
    return {"metrics": scores, "samples": samples}


@torch.inference_mode()
def answer(model: Any, processor: Any, conv: Conversation, max_new_tokens: int, max_pixels: int) -> dict:
    last = max(i for i, t in enumerate(conv.turns) if t.role == "assistant")
    prompt_turns = conv.turns[:last]
    n_images = sum(t.text.count(IMAGE_TOKEN) for t in prompt_turns)
    prompt = Conversation(prompt_turns, conv.images[:n_images], conv.ref)
    images = [cap_pixels(im, max_pixels) for im in load_images(prompt)]
    kwargs: dict[str, Any] = {
        "text": [render(processor, to_messages(prompt), generation_prompt=True)],
        "return_tensors": "pt",
    }
    if images:
        kwargs["images"] = [images] if _nested_images(processor) else images
    inputs = processor(**kwargs)
    was_training = model.training
    _eval_mode(model)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    model.train(was_training)
    new = out[0, inputs["input_ids"].shape[1] :]
    prediction = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    question = next((t.text for t in reversed(prompt_turns) if t.role == "user"), "")
    return {"ref": conv.ref, "question": question, "reference": conv.turns[last].text, "prediction": prediction}


def _eval_mode(model: Any) -> None:
    """Eval mode, except bitsandbytes 4-bit layers: in eval mode on CPU they repack their weights for inference, and
    a later training step then fails (an in-place bias add on a tensor that needs grad)."""
    model.eval()
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.training = True


def evaluate_model(
    model: str,
    data: str,
    out_dir: Path | None = None,
    metrics: list[str] | None = None,
    max_new_tokens: int = 64,
    max_pixels: int = 512 * 512,
    **_: Any,
) -> dict:
    """`visiontune eval` / `compare` for a VLM run folder (adapter or full model) or a model folder."""
    from visiontune.vlm.conversations import check_conversations, read_conversations

    vlm, processor = load_trained(model)
    convs, _ = check_conversations(read_conversations(data), "skip")
    report = generation_report(vlm, processor, convs, metrics or ["exact_match"], max_new_tokens, max_pixels)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "generation.json").write_text(json.dumps(report, indent=2))
    return report


def load_trained(source: str) -> tuple[Any, Any]:
    """A run folder (its adapter/ or model/), a PEFT adapter folder, or a plain model folder / hub id."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(source)
    for sub in ("merged", "model", "adapter"):
        if (path / sub).is_dir():
            path = path / sub
            break
    from visiontune.vlm.assembled import is_assembled, load_assembled

    if is_assembled(path):
        return load_assembled(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        config = json.loads((path / "adapter_config.json").read_text())
        base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"])
        return PeftModel.from_pretrained(base, str(path)).eval(), AutoProcessor.from_pretrained(path)
    return AutoModelForImageTextToText.from_pretrained(str(path)).eval(), AutoProcessor.from_pretrained(str(path))
