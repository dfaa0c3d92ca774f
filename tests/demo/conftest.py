"""Serving a demo page on a free local port for gradio_client, and an image to send it."""

from __future__ import annotations

import contextlib

import pytest
from PIL import Image


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (48, 36), (200, 40, 40)).save(path)
    return path


@contextlib.contextmanager
def served(source: str):
    """The demo of `source` launched (not blocking) on a free 127.0.0.1 port; yields (client, url)."""
    from gradio_client import Client

    from visiontune.demo.app import build_app
    from visiontune.demo.serve import free_port, serve

    app = build_app(source)
    url = serve(app, port=free_port(), block=False)
    try:
        yield Client(url, verbose=False), url
    finally:
        app.close()
