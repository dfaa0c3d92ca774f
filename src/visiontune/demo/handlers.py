"""What the demo asks each kind of model, as plain functions over PIL images (no Gradio here, so tests call them
directly). The model is loaded once, through the loaders `predict` / `ask` use, so the page answers what the CLI
answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from visiontune.core.errors import ModelError
from visiontune.core.kinds import model_kind


@dataclass
class Loaded:
    kind: str  # classifier | dual_encoder | vlm | assembled_vlm | detector | segmenter
    model: Any
    processor: Any = None
    class_names: list[str] = field(default_factory=list)
    has_base: bool = False  # a VLM adapter: the base model answers too, with the adapter switched off


def model_folder_of(source: str) -> Path:
    """A run folder's model (merged/, model/ or adapter/), or the folder itself."""
    from visiontune.core.sources import model_folder

    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelError(f"{source} is not a folder; give a run folder or an exported model folder.")
    for name in ("merged", "adapter"):
        if (path / name).is_dir() and not (path / "model").is_dir():
            return path / name
    return model_folder(path)


def load(source: str) -> Loaded:
    folder = model_folder_of(source)
    kind = model_kind(folder)
    if kind == "classifier":
        from visiontune.classify.resolve import resolve_classifier

        clf = resolve_classifier(str(folder)).eval()
        return Loaded(kind, clf, class_names=clf.class_names)
    if kind == "dual_encoder":
        from visiontune.clip.dual_encoder import resolve_dual_encoder

        encoder = resolve_dual_encoder(str(folder))
        encoder.model.eval()
        return Loaded(kind, encoder, class_names=list(encoder.meta.get("class_names") or []))
    if kind in ("vlm", "assembled_vlm"):
        from visiontune.vlm.ask import load_for_ask

        model, processor = load_for_ask(str(folder))
        return Loaded(kind, model, processor, has_base=hasattr(model, "disable_adapter"))
    if kind == "detector":
        from visiontune.detect.task import build_detector

        detector = build_detector(str(folder), None).eval()
        return Loaded(kind, detector, class_names=list(detector.class_names))
    if kind == "segmenter":
        from visiontune.segment.task import build_segmenter

        segmenter = build_segmenter(str(folder), None).eval()
        return Loaded(kind, segmenter, class_names=list(segmenter.class_names))
    raise ModelError(f"{source} holds no model visiontune can serve (no visiontune.json or known config.json).")


# ---- classifiers and dual encoders


@torch.inference_mode()
def classify(loaded: Loaded, image: Image.Image) -> dict[str, float]:
    """{label: probability} over every class (the page shows the top ones as bars)."""
    from visiontune.core.transforms import eval_transform

    clf = loaded.model
    probs = clf(eval_transform(clf.preprocess)(image.convert("RGB"))[None])["logits"].float().softmax(-1)[0]
    return {name: float(p) for name, p in zip(clf.class_names, probs.tolist(), strict=True)}


def parse_labels(text: str) -> list[str]:
    return list(dict.fromkeys(label.strip() for label in (text or "").split(",") if label.strip()))


@torch.inference_mode()
def zero_shot(loaded: Loaded, image: Image.Image, labels: str) -> dict[str, float]:
    """{label: probability} of the typed labels (comma-separated), through the zero-shot head `predict` builds."""
    from visiontune.clip.zero_shot import CLIPClassifier

    names = parse_labels(labels) or loaded.class_names
    if not names:
        raise ModelError("Type the labels to choose from, separated by commas (e.g. cat, dog, a red car).")
    clf = CLIPClassifier(loaded.model, names, loaded.model.meta.get("templates", "builtin")).eval()
    wrapped = Loaded("classifier", clf)
    return classify(wrapped, image)


@torch.inference_mode()
def search(loaded: Loaded, images: list[Image.Image], query: str) -> list[tuple[Image.Image, str]]:
    """The uploaded images ranked by similarity to the text `query` (best first), each with its cosine score."""
    from visiontune.core.transforms import eval_transform

    if not images or not (query or "").strip():
        return []
    encoder = loaded.model
    transform = eval_transform(encoder.preprocess)
    pixels = torch.stack([transform(im.convert("RGB")) for im in images])
    scores = (encoder.encode_images(pixels) @ encoder.encode_texts([query.strip()]).T)[:, 0]
    order = scores.argsort(descending=True).tolist()
    return [(images[i], f"{scores[i].item():.3f}") for i in order]


# ---- VLMs


def chat(
    loaded: Loaded, image: Image.Image | None, question: str, max_new_tokens: int = 128, base: bool = False
) -> Iterator[str]:
    """The answer so far, growing as tokens come (TextIteratorStreamer fed by generate in a thread). `base`: the
    adapter is switched off for this answer (the base model's)."""
    from transformers import TextIteratorStreamer

    from visiontune.vlm.ask import answer_image

    streamer = TextIteratorStreamer(loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            if base:
                with loaded.model.disable_adapter():
                    answer_image(loaded.model, loaded.processor, image, question, max_new_tokens, streamer)
            else:
                answer_image(loaded.model, loaded.processor, image, question, max_new_tokens, streamer)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    with _GENERATING:  # one generation at a time: the adapter switch is model-wide
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        worker.join()
    if errors:
        raise errors[0]
    yield text.strip()


_GENERATING = threading.Lock()


# ---- detectors and segmenters


@torch.inference_mode()
def detect(loaded: Loaded, image: Image.Image, conf: float = 0.25) -> list[tuple[tuple[int, int, int, int], str]]:
    """((x1, y1, x2, y2), "label score") per box above `conf`, in the image's pixels."""
    from visiontune.detect.task import detect_image

    detector = loaded.model
    detector.configure(conf, None, detector.max_detections)
    found = detect_image(detector, image.convert("RGB"))
    return [
        (tuple(int(round(float(v))) for v in box), f"{loaded.class_names[int(c)]} {float(s):.2f}")
        for box, s, c in zip(found["boxes"], found["scores"], found["labels"], strict=True)
    ]


@torch.inference_mode()
def segment(loaded: Loaded, image: Image.Image) -> list[tuple[Any, str]]:
    """(boolean mask [H, W], class name) per class present in the predicted mask."""
    from visiontune.segment.task import predict_mask

    mask = predict_mask(loaded.model, image.convert("RGB"))
    return [(mask == c, name) for c, name in enumerate(loaded.class_names) if (mask == c).any()]
