"""The demo page for each kind of model, built with Gradio Blocks over `handlers.py`. Every action has an api_name,
so gradio_client (and the tests) call exactly what the buttons call."""

from __future__ import annotations

import os
from typing import Any

from visiontune.demo import handlers
from visiontune.demo.handlers import Loaded

TOP_K = 5

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the demo sends nothing anywhere


def build_app(source: str, loaded: Loaded | None = None, title: str | None = None) -> Any:
    """A gr.Blocks for the model in `source` (run folder or model folder)."""
    import gradio as gr

    loaded = loaded or handlers.load(source)
    with gr.Blocks(title=title or f"visiontune demo: {source}") as app:
        gr.Markdown(f"## {title or 'visiontune demo'}\n`{source}` — {loaded.kind.replace('_', ' ')}")
        PAGES[loaded.kind](gr, loaded)
    return app


def _classifier(gr: Any, loaded: Loaded) -> None:
    with gr.Row():
        image = gr.Image(type="pil", label="Image")
        label = gr.Label(num_top_classes=min(TOP_K, len(loaded.class_names)), label="Top classes")
    button = gr.Button("Classify", variant="primary")
    button.click(lambda im: handlers.classify(loaded, im), image, label, api_name="classify")


def _dual_encoder(gr: Any, loaded: Loaded) -> None:
    with gr.Tab("Zero-shot"):
        with gr.Row():
            image = gr.Image(type="pil", label="Image")
            with gr.Column():
                labels = gr.Textbox(
                    value=", ".join(loaded.class_names), label="Labels (comma-separated)", placeholder="cat, dog"
                )
                label = gr.Label(num_top_classes=TOP_K, label="Zero-shot")
        gr.Button("Classify", variant="primary").click(
            lambda im, text: handlers.zero_shot(loaded, im, text), [image, labels], label, api_name="zero_shot"
        )
    with gr.Tab("Search images by text"):
        files = gr.File(file_count="multiple", file_types=["image"], label="Images to search")
        query = gr.Textbox(label="Text query", placeholder="a photo of a dog")
        gallery = gr.Gallery(label="Best matches first", columns=4)

        def run_search(paths: list[str] | None, text: str) -> list:
            from PIL import Image

            return handlers.search(loaded, [Image.open(p) for p in paths or []], text)

        gr.Button("Search").click(run_search, [files, query], gallery, api_name="search")


def _vlm(gr: Any, loaded: Loaded) -> None:
    with gr.Row():
        image = gr.Image(type="pil", label="Image")
        with gr.Column():
            question = gr.Textbox(label="Question", value="Describe the image.")
            tokens = gr.Slider(1, 512, value=128, step=1, label="Max new tokens")
    with gr.Row():
        tuned = gr.Textbox(label="Fine-tuned answer", lines=4)
        base = gr.Textbox(label="Base model answer", lines=4, visible=loaded.has_base)
    ask = gr.Button("Ask", variant="primary")

    # generator functions (not lambdas returning generators): Gradio streams what a generator function yields
    def answer(im, q, n):
        yield from handlers.chat(loaded, im, q, int(n))

    def answer_base(im, q, n):
        yield from handlers.chat(loaded, im, q, int(n), base=True)

    ask.click(answer, [image, question, tokens], tuned, api_name="ask")
    if loaded.has_base:
        ask.click(answer_base, [image, question, tokens], base, api_name="ask_base")


def _detector(gr: Any, loaded: Loaded) -> None:
    with gr.Row():
        image = gr.Image(type="pil", label="Image")
        boxes = gr.AnnotatedImage(label="Detections")
    conf = gr.Slider(0.0, 1.0, value=0.25, step=0.01, label="Score threshold")

    def run(im, threshold):
        return (im, handlers.detect(loaded, im, threshold)) if im is not None else None

    gr.Button("Detect", variant="primary").click(run, [image, conf], boxes, api_name="detect")


def _segmenter(gr: Any, loaded: Loaded) -> None:
    with gr.Row():
        image = gr.Image(type="pil", label="Image")
        masks = gr.AnnotatedImage(label="Segments")

    def run(im):
        return (
            (im, [(m.astype("float32"), name) for m, name in handlers.segment(loaded, im)]) if im is not None else None
        )

    gr.Button("Segment", variant="primary").click(run, image, masks, api_name="segment")


PAGES = {
    "classifier": _classifier,
    "dual_encoder": _dual_encoder,
    "vlm": _vlm,
    "assembled_vlm": _vlm,
    "detector": _detector,
    "segmenter": _segmenter,
}
