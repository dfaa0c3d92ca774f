"""Evaluate a VLM by generation: greedy answers to every conversation's last user turn, scored against the
reference answer with the metrics of vlm/generation_metrics.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visiontune.vlm.conversations import IMAGE_TOKEN, Conversation, load_images, to_messages
from visiontune.vlm.tokenize import cap_pixels, nested_images, render


def generation_report(
    model: Any, processor: Any, convs: list[Conversation], metrics: list[str], max_new_tokens: int, max_pixels: int
) -> dict:
    from visiontune.vlm.generation_metrics import compute_metrics

    samples = [answer(model, processor, conv, max_new_tokens, max_pixels) for conv in convs]
    scores = compute_metrics(metrics, [s["prediction"] for s in samples], [[s["reference"]] for s in samples])
    return {"metrics": scores, "samples": samples}


def prompt_inputs(processor: Any, prompt: Conversation, max_pixels: int) -> Any:
    """The processor's tensors for a prompt (its images capped at max_pixels) that ends where the answer starts."""
    images = [cap_pixels(im, max_pixels) for im in load_images(prompt)]
    kwargs: dict[str, Any] = {
        "text": [render(processor, to_messages(prompt), generation_prompt=True)],
        "return_tensors": "pt",
    }
    if images:
        kwargs["images"] = [images] if nested_images(processor) else images
    return processor(**kwargs)


@torch.inference_mode()
def answer(model: Any, processor: Any, conv: Conversation, max_new_tokens: int, max_pixels: int) -> dict:
    last = max(i for i, t in enumerate(conv.turns) if t.role == "assistant")
    prompt_turns = conv.turns[:last]
    n_images = sum(t.text.count(IMAGE_TOKEN) for t in prompt_turns)
    inputs = prompt_inputs(processor, Conversation(prompt_turns, conv.images[:n_images], conv.ref), max_pixels)
    was_training = model.training
    model.eval()  # a model that trains has 4-bit layers that stay trainable through this (vlm/quantized.py)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    model.train(was_training)
    new = out[0, inputs["input_ids"].shape[1] :]
    prediction = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    question = next((t.text for t in reversed(prompt_turns) if t.role == "user"), "")
    return {"ref": conv.ref, "question": question, "reference": conv.turns[last].text, "prediction": prediction}


def evaluate_model(
    model: str,
    data: str,
    out_dir: Path | None = None,
    metrics: list[str] | None = None,
    max_new_tokens: int = 64,
    max_pixels: int = 512 * 512,
    on_bad_sample: str = "error",
    **_: Any,
) -> dict:
    """`visiontune eval` for a VLM run folder (adapter or full model) or a model folder. Bad records follow the
    training rule: the first one stops the run, unless on_bad_sample="skip" (they are listed in the report)."""
    convs, skipped = checked_conversations(data, on_bad_sample)
    report = evaluate_conversations(model, convs, metrics or ["exact_match"], max_new_tokens, max_pixels)
    report["skipped_samples"] = skipped
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "generation.json").write_text(json.dumps(report, indent=2))
    return report


def checked_conversations(data: str, on_bad_sample: str = "error") -> tuple[list[Conversation], list[dict]]:
    """Evaluation conversations that pass training's checks, and the left-out ones as [{ref, reason}]."""
    from visiontune.core.errors import DataError
    from visiontune.vlm.conversations import check_conversations, read_conversations

    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"on_bad_sample is {on_bad_sample!r}; use error or skip.")
    convs, bad = check_conversations(read_conversations(data), "skip")
    if bad and on_bad_sample == "error":
        more = f" (and {len(bad) - 1} more bad record(s))" if len(bad) > 1 else ""
        raise DataError(f"{bad[0][0]} {bad[0][1]}{more}; fix or remove it, or pass --skip-bad to leave it out.")
    return convs, [{"ref": ref, "reason": reason} for ref, reason in bad]


def evaluate_conversations(
    model: str, convs: list[Conversation], metrics: list[str], max_new_tokens: int = 64, max_pixels: int = 512 * 512
) -> dict:
    """Load `model` and answer already-checked conversations (compare runs both models on one checked set)."""
    vlm, processor = load_trained(model)
    return generation_report(vlm, processor, convs, metrics, max_new_tokens, max_pixels)


def load_trained(source: str) -> tuple[Any, Any]:
    """A run folder (its adapter/ or model/), a PEFT adapter folder, or a plain model folder / hub id. A damaged or
    partly written local folder is a ModelError naming it, not a loader traceback."""
    from visiontune.core.errors import ModelError

    path = _model_folder(Path(source))
    try:
        return _load(path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # JSONDecodeError is a ValueError
        if not path.exists():
            raise
        broken = _broken_json(path)
        what = f"{broken} is not valid JSON" if broken else (str(err).strip().splitlines() or [repr(err)])[0][:200]
        raise ModelError(
            f"{path} cannot be loaded ({what}); a damaged or partly written model folder has to be exported or "
            "trained again, or point at a complete one."
        ) from err


def _broken_json(folder: Path) -> Path | None:
    """The first JSON file of a model folder (or its direct subfolders) that does not parse."""
    for file in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        try:
            json.loads(file.read_text())
        except (OSError, ValueError):
            return file
    return None


def _model_folder(path: Path) -> Path:
    for sub in ("merged", "model", "adapter"):
        if (path / sub).is_dir():
            return path / sub
    return path


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visiontune.vlm.assembled import is_assembled, load_assembled

    if is_assembled(path):
        return load_assembled(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        config = json.loads((path / "adapter_config.json").read_text())
        base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"])
        return PeftModel.from_pretrained(base, str(path)).eval(), AutoProcessor.from_pretrained(path)
    return AutoModelForImageTextToText.from_pretrained(str(path)).eval(), AutoProcessor.from_pretrained(str(path))
