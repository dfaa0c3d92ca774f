"""The demo and the report as a person sees them: `visiontune demo` (the installed CLI, in its own process, on a free
local port) driven in headless Chromium — upload an image, press the button, read what the page shows — against what
`visiontune predict` / `visiontune ask` print for the same image; and a run's report.html opened in the same browser
(every picture decoded, no console error). Debian's Chromium through Playwright's Python package, which is pointed at
it and downloads no browser: `make setup-browser` installs both, `make test-browser` runs these (marker `browser`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

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


def _demo(source: Path):
    """`visiontune demo SOURCE --port P` started (not waited for); returns (process, url)."""
    from visiontune.demo.serve import free_port

    port = free_port()
    command = [str(Path(sys.executable).with_name("visiontune")), "demo", str(source), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def demos(browser, fixtures_dir, tmp_path_factory):
    """Both demos started at once (their imports overlap): a classify run folder and a tiny Idefics3 VLM."""
    from tests.conftest import fixture_seed
    from visiontune.testing.vlm_fixtures import tiny_vlm

    root = tmp_path_factory.mktemp("browser-demos")
    shutil.copytree(fixtures_dir / "timm-vit", root / "run" / "model")
    with fixture_seed():
        vlm = tiny_vlm("idefics3", root / "idefics3")
    started = {"classifier": (root / "run", *_demo(root / "run")), "vlm": (vlm, *_demo(vlm))}
    yield started
    for _, process, _ in started.values():
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def upload(tmp_path) -> Path:
    """A non-square picture with some structure (a bar on a gradient), so the answer is about real pixels."""
    image = Image.linear_gradient("L").resize((60, 44)).convert("RGB")
    image.paste((230, 40, 40), (10, 8, 22, 36))
    path = tmp_path / "upload.png"
    image.save(path)
    return path


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


def _upload(page, image: Path) -> None:
    page.wait_for_selector("input[type=file]", state="attached", timeout=WAIT_MS)
    page.locator("input[type=file]").first.set_input_files(str(image))
    page.locator("[data-testid=image] img").first.wait_for(timeout=WAIT_MS)  # the preview: the upload landed


def test_classifier_page_shows_what_predict_prints(browser, demos, upload, cli, tmp_path):
    run, process, url = demos["classifier"]
    with _one_thread():
        code, printed, err = cli("predict", run, upload, "--top-k", "3")
    assert code == 0, err
    # `  44.28%  cat` per line, best first
    expected = [(label, float(p) / 100) for p, label in re.findall(r"^\s+([\d.]+)%\s+(\S.*)$", printed, re.M)]
    assert len(expected) == 3

    wait_for(url, process)
    page = _open(browser, url)
    _upload(page, upload)
    page.get_by_role("button", name="Classify").click()
    output = page.get_by_test_id("label")
    page.get_by_test_id("label-output-value").filter(has_text=expected[0][0]).wait_for(timeout=WAIT_MS)
    bars = output.locator("meter")
    shown = {bars.nth(i).get_attribute("aria-label"): float(bars.nth(i).get_attribute("value")) for i in range(3)}
    for label, prob in expected:  # predict prints two decimals of a percent: within 5e-5
        assert shown[label] == pytest.approx(prob, abs=5e-5)
        percent = output.locator(f"[data-testid='{label}-confidence-set'] dd").inner_text()
        assert percent == f"{round(prob * 100)}%"
    page.screenshot(path=str(tmp_path / "classifier.png"), full_page=True)
    assert (tmp_path / "classifier.png").stat().st_size > 0
    assert page.errors == []


def test_vlm_page_shows_what_ask_prints(browser, demos, upload, cli, tmp_path):
    folder, process, url = demos["vlm"]
    question = "What colour is the bar?"
    with _one_thread():
        code, printed, err = cli("ask", folder, "--image", upload, question)
    assert code == 0, err
    expected = printed.strip()
    assert expected, "the tiny VLM answered nothing: the comparison would show nothing"

    wait_for(url, process)
    page = _open(browser, url)
    _upload(page, upload)
    page.get_by_label("Question").fill(question)
    page.get_by_role("button", name="Ask").click()
    from playwright.sync_api import expect

    answer = page.get_by_label("Fine-tuned answer")
    expect(answer).to_have_value(expected, timeout=WAIT_MS)
    page.screenshot(path=str(tmp_path / "vlm.png"), full_page=True)
    assert page.errors == []


def test_report_html_pictures_render(browser, tmp_path):
    from tests.report.test_report import _write_run
    from visiontune.report import write_report

    _, html = write_report(_write_run(tmp_path / "run"))
    page = _open(browser, html.as_uri())
    page.wait_for_load_state("load")
    sizes = page.evaluate("[...document.images].map(img => [img.alt, img.complete, img.naturalWidth])")
    assert len(sizes) >= 3  # loss, metrics, confusion matrix at least
    assert [alt for alt, complete, width in sizes if not (complete and width > 0)] == []
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert page.errors == []
