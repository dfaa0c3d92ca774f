"""`visiontune ask`: question a VLM (a vlm_sft / vlm_assemble run, an adapter or an export) about an image, the
answer streamed to the console as it is generated (transformers `TextStreamer`), or a JSONL batch of questions
answered into a JSONL file. Loading is `vlm.generate.load_trained`, the loader of `eval`; the prompt is rendered by the
model's own chat template, as training rendered it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from visiontune.core.errors import DataError
from visiontune.vlm.conversations import IMAGE_TOKEN, Conversation, Turn, to_messages
from visiontune.vlm.tokenize import cap_pixels, nested_images, render

MAX_PIXELS = 512 * 512  # as `eval` caps a VLM's images


def prompt_inputs(processor: Any, image: Image.Image | None, question: str) -> dict:
    """The processor's tensors for one user turn (the image first, then the question) and a generation prompt."""
    text = (IMAGE_TOKEN if image is not None else "") + question
    conv = Conversation([Turn("user", text)], [image] if image is not None else [], "ask")
    kwargs: dict[str, Any] = {
        "text": [render(processor, to_messages(conv), generation_prompt=True)],
        "return_tensors": "pt",
    }
    if image is not None:
        image = cap_pixels(image.convert("RGB"), MAX_PIXELS)
        kwargs["images"] = [[image]] if nested_images(processor) else [image]
    return processor(**kwargs)


@torch.inference_mode()
def answer_image(
    model: Any,
    processor: Any,
    image: Image.Image | None,
    question: str,
    max_new_tokens: int = 128,
    streamer: Any = None,
) -> str:
    """Greedy answer; `streamer` (a transformers streamer) receives the tokens as they come."""
    inputs = prompt_inputs(processor, image, question)
    model.eval()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def console_streamer(processor: Any) -> Any:
    from transformers import TextStreamer

    return TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)


def open_question_image(path: str | Path, where: str) -> Image.Image:
    from visiontune.core.images import open_image

    try:
        return open_image(Path(path).expanduser(), MAX_PIXELS * 64)
    except Exception as err:  # noqa: BLE001 - any decode failure is the same one sentence
        raise DataError(f"{where}: {path} cannot be read as an image ({err}); give a readable image file.") from None


def read_questions(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, {"image": PATH (optional), "question": TEXT}) per non-empty line; image paths are taken
    relative to the file. A bad line is one sentence naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--data {path} cannot be read ({err}); give a JSONL file of questions.") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path} line {number} is not JSON; write one JSON object per line.") from None
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise DataError(
                f'{path} line {number} has no "question" text; write {{"image": "a.jpg", "question": "..."}}.'
            )
        image = record.get("image")
        if image is not None:
            image = Path(image).expanduser()
            record = {**record, "image": str(image if image.is_absolute() else path.parent / image)}
        yield number, record


def ask_batch(model: Any, processor: Any, data: Path, out: Path, max_new_tokens: int) -> int:
    """Answer every question of `data` into `out` (JSONL: the record + "answer"); returns the count. Lines are
    written as they are answered, so an interrupted batch keeps what it finished."""
    count = 0
    with out.open("w", encoding="utf-8") as sink:
        for number, record in read_questions(data):
            image = record.get("image")
            picture = open_question_image(image, f"{data} line {number}") if image else None
            reply = answer_image(model, processor, picture, record["question"], max_new_tokens)
            sink.write(json.dumps({**record, "answer": reply}, ensure_ascii=False) + "\n")
            sink.flush()
            count += 1
    return count


def load_for_ask(model: str) -> tuple[Any, Any]:
    """`load_trained`, after refusing in one sentence a folder that holds another kind of model."""
    from visiontune.core.errors import ModelError
    from visiontune.core.kinds import model_kind
    from visiontune.vlm.generate import _model_folder, load_trained

    folder = _model_folder(Path(model).expanduser())
    kind = model_kind(folder) if folder.is_dir() else "unknown"  # not a folder: a hub id, for the loader to try
    if kind not in ("unknown", "vlm", "assembled_vlm"):
        raise ModelError(f"{model} holds a {kind}, not a VLM; ask it with `visiontune predict {model} IMAGE`.")
    return load_trained(model)


DEFAULT_PROMPT = "Describe the image."


def predict_images(model: str, inputs: list[str], prompt: str | None = None, max_new_tokens: int = 64) -> list[dict]:
    """`visiontune predict` for a VLM: {"input", "prompt", "answer"} per image (greedy)."""
    prompt = prompt or DEFAULT_PROMPT
    images = [open_question_image(path, "predict") for path in inputs]  # every file checked before the model loads
    vlm, processor = load_for_ask(model)
    return [
        {"input": path, "prompt": prompt, "answer": answer_image(vlm, processor, image, prompt, max_new_tokens)}
        for path, image in zip(inputs, images, strict=True)
    ]
