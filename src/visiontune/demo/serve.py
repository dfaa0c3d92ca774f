"""Launching the demo: on 127.0.0.1 unless a host is given, no public share link unless asked, a port in use said in
one sentence before Gradio starts."""

from __future__ import annotations

import socket
from typing import Any

from visiontune.core.errors import VisiontuneError

DEFAULT_PORT = 7860


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise VisiontuneError(
                f"Port {port} on {host} is in use (another demo?); pass --port with a free one."
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve(app: Any, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True) -> str:
    """Launch `app`; returns its local URL (and blocks until Ctrl+C when `block`)."""
    port = port or DEFAULT_PORT
    check_port(host, port)
    app.queue()  # streamed answers (generators) go through the queue
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, inbrowser=False)
    url = f"http://{host}:{port}/"
    if block:
        print(f"Serving on {url}{' (and a public share link)' if share else ''}; Ctrl+C stops it.", flush=True)
        try:
            app.block_thread()
        finally:
            app.close()
    return url
