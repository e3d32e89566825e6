"""vir-demo end to end in a real browser: Debian's chromium driven by Playwright (`executable_path`; no
browser download). The server is the console script in a subprocess; the page's streamed answer must be
vir-eval's for the same synthetic test record (typed, then from the page's examples), a non-image upload must
show a message and leave the server answering. The screenshot is kept in tests/artifacts/demo_chat.png.

`make test` installs chromium with apt when it can (scripts/ensure_browser.sh); without a browser this file
skips, saying so. VIR_CHROMIUM names another Chromium binary.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from app_fixtures import MAX_NEW_TOKENS, eval_reference

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium():
    named = os.environ.get("VIR_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or scripts/ensure_browser.sh as root); "
    "set VIR_CHROMIUM to use another")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return eval_reference(tmp_path_factory)


@pytest.fixture(scope="module")
def server(ref, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("demo_server") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vir.cli.demo", str(ref.run_dir), "--port", str(port),
                                 "--host", "127.0.0.1", "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vir-demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vir-demo did not answer on {url} within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.set_default_timeout(60_000)
        tab.goto(server[0])
        tab.wait_for_selector("#send")
        yield tab
        browser.close()


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _ask(page, files, question: str, expect: str) -> str:
    """Upload `files`, type `question`, press Send, wait until the status box reads `expect`...; its text."""
    page.locator("#images input[type=file]").set_input_files([str(f) for f in files])
    page.wait_for_selector("#images .file-preview, #images table", timeout=30_000)
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    page.wait_for_function("([sel, want]) => document.querySelector(sel).innerText.startsWith(want)",
                           arg=["#status", expect], timeout=60_000)
    return _status(page)


def _answers(page) -> list:
    return [text.strip() for text in page.locator("#chat [data-testid=bot]").all_inner_texts()]


def test_the_page_answers_as_vir_eval_and_survives_a_bad_upload(page, server, ref, tmp_path):
    url, proc, log = server
    header = page.locator("#header").inner_text()
    assert str(ref.run_dir) in header and "cpu" in header

    status = _ask(page, [ref.image], ref.question, "Done")
    assert _answers(page) == [ref.answer], (status, ref)

    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image")
    status = _ask(page, [notes], ref.question, "Error")
    assert "notes.txt" in status and "not an image" in status, status
    assert _answers(page) == [ref.answer]  # the conversation so far is kept
    assert proc.poll() is None, log.read_text()[-3000:]

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=bot]').length === 0")
    # An example of the run's test split fills in the upload and the question: the same record, the same answer.
    page.get_by_text(ref.image.name, exact=True).first.click()
    page.wait_for_function("(want) => document.querySelector('#question textarea').value === want",
                           arg=ref.question, timeout=20_000)
    page.locator("#send").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.startsWith('Done')", timeout=60_000)
    assert _answers(page) == [ref.answer]
    assert proc.poll() is None
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_chat.png"), full_page=True)
    assert (ARTIFACTS / "demo_chat.png").stat().st_size > 10_000


def test_the_run_tab_shows_the_metrics_table(page):
    page.get_by_role("tab", name="Run").click()
    table = page.locator("#metrics")
    table.wait_for(timeout=20_000)
    text = table.inner_text()
    assert "overall" in text and "accuracy" in text, text
