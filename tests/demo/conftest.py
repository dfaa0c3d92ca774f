"""Serving a demo page on a free local port for gradio_client, waiting for a page served by another process, and an
image to send it."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

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


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180, log: Path | None = None) -> None:
    """Until `url` answers; a process that exits first fails with the end of its stderr (or of `log`, where its
    stderr goes)."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = log.read_text(errors="replace") if log is not None else process.stderr.read()
            raise AssertionError(f"{process.args} exited with {process.returncode}: {said[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{process.args} did not serve {url} within {seconds} s")
