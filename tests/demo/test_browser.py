"""The demo and the report as a person sees them: `visiontune demo` (the installed CLI, in its own process, on a free
local port) for every kind of model, driven in headless Chromium — upload an image, press the button, read what the
page shows — against what `visiontune predict` / `visiontune ask` print for the same image; and a run's report.html
opened in the same browser (every picture decoded, no console error). Debian's Chromium through Playwright's Python
package, which is pointed at it and downloads no browser: `make setup-browser` installs both, `make test-browser` runs
these (marker `browser`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.demo.conftest import wait_for

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("VISIONTUNE_CHROMIUM", "/usr/bin/chromium")
# Headless with nothing that reaches out: no sandbox (CI runs as root), no GPU, no sync/update/background fetches.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 120_000  # a busy 2-core machine: the page answers within seconds, the wait only bounds a hang


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A Chromium context with a new, empty profile; skips (saying what to install) where there is none."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: `make setup-browser` installs it (apt) and Playwright's package")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="`make setup-browser` installs Playwright")
    pytest.importorskip("gradio", reason="the demo needs the `demo` extra (`make setup`)")
    with playwright_api.sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1100, "height": 640},
        )
        try:
            yield context
        finally:
            context.close()


def _open(context, url: str):
    """A new tab on `url`, its console errors collected in `page.errors`."""
    page = context.new_page()
    page.errors = []
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url)
    return page


def _free_ports(count: int) -> list[int]:
    """`count` distinct free local ports (all held while they are picked, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _demo(source: Path, port: int, log: Path):
    """`visiontune demo SOURCE --port PORT` started (not waited for; its stderr to `log`); returns (process, url)."""
    command = [str(Path(sys.executable).with_name("visiontune")), "demo", str(source), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink, text=True)
    return process, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def demos(browser, fixtures_dir, tmp_path_factory):
    """One demo per kind of model, all started at once (their imports overlap): a classify run folder, a tiny CLIP,
    a tiny Idefics3 VLM, a tiny DETR and a tiny SegFormer. {kind: (source, process, url, stderr log)}."""
    from tests.conftest import fixture_seed
    from visiontune.testing.vlm_fixtures import tiny_vlm

    root = tmp_path_factory.mktemp("browser-demos")
    shutil.copytree(fixtures_dir / "timm-vit", root / "run" / "model")
    with fixture_seed():
        vlm = tiny_vlm("idefics3", root / "idefics3")
    sources = {
        "classifier": root / "run",
        "dual_encoder": fixtures_dir / "clip",
        "vlm": vlm,
        "detector": fixtures_dir / "detr",
        "segmenter": fixtures_dir / "segformer",
    }
    ports = dict(zip(sources, _free_ports(len(sources)), strict=True))
    logs = {kind: root / f"{kind}.log" for kind in sources}
    started = {kind: (src, *_demo(src, ports[kind], logs[kind]), logs[kind]) for kind, src in sources.items()}
    yield started
    for _, process, _, _ in started.values():
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def _one_thread():
    """The CLI runs in this process on one thread, as the demo's process does: the same kernels, the same sums."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _page(browser, demos, kind: str, image: Path):
    """The `kind` demo's page once it serves, with `image` uploaded (its preview shown)."""
    _, process, url, log = demos[kind]
    wait_for(url, process, log=log)
    page = _open(browser, url)
    page.wait_for_selector("input[type=file]", state="attached", timeout=WAIT_MS)
    page.locator("input[type=file]").first.set_input_files(str(image))
    page.locator("[data-testid=image] img").first.wait_for(timeout=WAIT_MS)
    return page


def _screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    assert page.errors == []


def _printed_top(printed: str) -> list[tuple[str, float]]:
    """`  44.28%  cat` lines of `visiontune predict` as (label, probability), best first."""
    return [(label, float(p) / 100) for p, label in re.findall(r"^\s+([\d.]+)%\s+(\S.*?)\s*$", printed, re.M)]


def _shown_bars(page, expected: list[tuple[str, float]]) -> None:
    """The gr.Label shows `expected`: each bar's probability within 5e-5 (predict prints two decimals of a percent),
    its rounded percent as text."""
    output = page.get_by_test_id("label")
    page.get_by_test_id("label-output-value").filter(has_text=expected[0][0]).wait_for(timeout=WAIT_MS)
    bars = output.locator("meter")
    shown = {bars.nth(i).get_attribute("aria-label"): float(bars.nth(i).get_attribute("value")) for i in range(3)}
    for label, prob in expected:
        assert shown[label] == pytest.approx(prob, abs=5e-5)
        percent = output.locator(f"[data-testid='{label}-confidence-set'] dd").inner_text()
        assert percent == f"{round(prob * 100)}%"


def test_classifier_page_shows_what_predict_prints(browser, demos, photo, cli, tmp_path):
    with _one_thread():
        code, printed, err = cli("predict", demos["classifier"][0], photo, "--top-k", "3")
    assert code == 0, err
    expected = _printed_top(printed)
    assert len(expected) == 3
    page = _page(browser, demos, "classifier", photo)
    page.get_by_role("button", name="Classify").click()
    _shown_bars(page, expected)
    _screenshot(page, tmp_path / "classifier.png")


def test_dual_encoder_page_zero_shot_over_typed_labels(browser, demos, photo, cli, tmp_path):
    with _one_thread():
        code, printed, err = cli("predict", demos["dual_encoder"][0], photo, "--labels", "red,green,blue")
    assert code == 0, err
    expected = _printed_top(printed)
    assert sorted(label for label, _ in expected) == ["blue", "green", "red"]
    page = _page(browser, demos, "dual_encoder", photo)
    page.get_by_label("Labels (comma-separated)").fill("red, green ,blue")
    page.get_by_role("button", name="Classify").click()
    _shown_bars(page, expected)
    _screenshot(page, tmp_path / "dual_encoder.png")


def test_vlm_page_shows_what_ask_prints(browser, demos, photo, cli, tmp_path):
    from playwright.sync_api import expect

    question = "What colour is it?"
    with _one_thread():
        code, printed, err = cli("ask", demos["vlm"][0], "--image", photo, question)
    assert code == 0, err
    expected = printed.strip()
    assert expected, "the tiny VLM answered nothing: the comparison would show nothing"
    page = _page(browser, demos, "vlm", photo)
    page.get_by_label("Question").fill(question)
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_label("Fine-tuned answer")).to_have_value(expected, timeout=WAIT_MS)
    _screenshot(page, tmp_path / "vlm.png")


def _legend(page) -> list[str]:
    """The annotated image's legend, sorted: one entry per box (detector) or per class present (segmenter)."""
    items = page.locator(".legend-item")
    items.first.wait_for(timeout=WAIT_MS)
    return sorted(items.all_inner_texts())


def test_detector_page_shows_the_boxes_predict_prints(browser, demos, photo, cli, tmp_path):
    with _one_thread():  # both at the default score threshold (0.25)
        code, printed, err = cli("predict", demos["detector"][0], photo, "--out", tmp_path / "predict")
    assert code == 0, err
    boxes = sorted(  # `  25.35%  cat  [12, 9, 36, 27]` per box -> (label, score)
        (label, float(p) / 100) for p, label in re.findall(r"^\s+([\d.]+)%\s+(\S+)\s+\[", printed, re.M)
    )
    assert boxes, "the tiny detector found nothing: the comparison would show nothing"
    page = _page(browser, demos, "detector", photo)
    page.get_by_role("button", name="Detect").click()
    shown = sorted((label, float(score)) for label, score in (item.rsplit(" ", 1) for item in _legend(page)))
    assert [label for label, _ in shown] == [label for label, _ in boxes]
    for (_, score), (_, expected) in zip(shown, boxes, strict=True):
        assert score == pytest.approx(expected, abs=0.0051)  # the page shows two decimals, predict two of a percent
    _screenshot(page, tmp_path / "detector.png")


def test_segmenter_page_shows_the_classes_predict_prints(browser, demos, photo, cli, tmp_path):
    with _one_thread():
        code, printed, err = cli("predict", demos["segmenter"][0], photo, "--top-k", "10", "--out", tmp_path / "out")
    assert code == 0, err
    expected = sorted(label for label, _ in _printed_top(printed))
    assert expected
    page = _page(browser, demos, "segmenter", photo)
    page.get_by_role("button", name="Segment").click()
    assert _legend(page) == expected
    _screenshot(page, tmp_path / "segmenter.png")


def test_report_html_pictures_render(browser, tmp_path):
    from tests.report.test_report import _write_run
    from visiontune.report import write_report

    _, html = write_report(_write_run(tmp_path / "run"))
    page = _open(browser, html.as_uri())
    page.wait_for_load_state("load")
    sizes = page.evaluate("[...document.images].map(img => [img.alt, img.complete, img.naturalWidth])")
    assert len(sizes) >= 3  # loss, metrics, confusion matrix at least
    assert [alt for alt, complete, width in sizes if not (complete and width > 0)] == []
    _screenshot(page, tmp_path / "report.png")
