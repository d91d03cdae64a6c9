"""The app in a real browser: `streamlit run app.py` on a free port, driven by Playwright in Debian's headless
Chromium. Visits every page (no exception box), runs a trace and waits for its heat maps, makes an edit and
sees the after-text change, and checks that a second browser context does not see the first one's edit.

Screenshots of the failing page go to screenshots/ (gitignored). ROME_STUDIO_SHOTS=<folder> also keeps a
screenshot of every step. Skipped with a reason when /usr/bin/chromium or Playwright is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "screenshots"
EIFFEL = "The Eiffel Tower is located in the city of"
PAGES = {
    "home": "/",
    "trace": "/Trace_explorer",
    "averages": "/Averages",
    "editor": "/Fact_editor",
    "sentiment": "/Sentiment_trace",
}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium (make browser-deps)"
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    # one torch thread: the test checks behaviour, and a busy CI machine must not oversubscribe the cores
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    SCREENSHOTS.mkdir(exist_ok=True)
    log = open(SCREENSHOTS / "streamlit.log", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not start (exit code {process.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield browser
        browser.close()


def new_page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    return context.new_page()


@contextmanager
def step(page, name: str):
    """Run a step; on failure save a screenshot of the page to screenshots/<name>.png."""
    try:
        yield
    except BaseException:
        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
        raise
    shots = os.environ.get("ROME_STUDIO_SHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)


def wait_idle(page, timeout: float = 120_000) -> None:
    """Until the script run is over (Streamlit's "Running..." status is gone) and the page is drawn."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout)
    page.wait_for_timeout(500)
    page.wait_for_function(
        """() => !document.querySelector(
                   '[data-testid="stStatusWidgetRunningIcon"], [data-testid="stStatusWidgetRunningManIcon"]')
             && !Array.from(document.querySelectorAll('[data-testid="stStatusWidget"]'))
                   .some(e => /Running/i.test(e.innerText))""",
        timeout=timeout,
    )
    page.locator("h1").first.wait_for(timeout=timeout)


def try_output(page, timeout: float = 300_000) -> str:
    """The text "Try the model" shows (its own container), once the run its Generate click started is over."""
    page.locator('.st-key-try_output [data-testid="stCode"]').wait_for(timeout=timeout)
    wait_idle(page)
    return page.locator('.st-key-try_output [data-testid="stCode"]').last.inner_text()


def visit(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    wait_idle(page)


def assert_no_exception(page) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, boxes.first.inner_text()


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(300)


def test_every_page_loads_without_an_exception(server, browser):
    page = new_page(browser)
    for name, path in PAGES.items():
        with step(page, f"page_{name}"):
            visit(page, server + path)
            assert_no_exception(page)
            assert page.locator("h1").first.inner_text().strip()
    with step(page, "home_card"):
        visit(page, server + "/")
        page.get_by_text("Hidden size").first.wait_for(timeout=60_000)
        assert "576" in page.locator('[data-testid="stMetric"]').all_inner_texts().__str__()
    page.context.close()


def test_trace_draws_three_heatmaps(server, browser):
    page = new_page(browser)
    with step(page, "trace"):
        visit(page, server + PAGES["trace"])
        set_number(page, "Samples", 1)
        page.get_by_role("button", name="Trace", exact=True).click()
        page.wait_for_selector('[data-testid="stProgress"]', timeout=30_000)
        charts = page.locator('[data-testid="stVegaLiteChart"]')
        charts.nth(2).wait_for(timeout=900_000)  # hidden, mlp and attn: the estimate, drawn during the run
        page.locator('[data-testid="stMetric"]').first.wait_for(timeout=900_000)  # drawn when the exact trace is done
        wait_idle(page, timeout=900_000)
        assert charts.count() == 3
        assert "Paris" in page.locator('[data-testid="stMetric"]').first.inner_text()
        assert_no_exception(page)
    page.context.close()


def test_edit_changes_the_text_for_this_session_only(server, browser):
    first = new_page(browser)
    with step(first, "edit"):
        visit(first, server + PAGES["editor"])
        first.get_by_label("Statistics tokens", exact=True).fill("4096")  # in the form: sent with the button
        first.get_by_role("button", name="Apply edit").click()
        first.get_by_text("Edit history (this session)").wait_for()
        first.locator('[data-testid="stCode"]').nth(5).wait_for(timeout=900_000)  # 3 before + 3 after texts
        wait_idle(first, timeout=60_000)
        assert_no_exception(first)
        texts = first.locator('[data-testid="stCode"]').all_inner_texts()
        assert "Paris" in texts[0] and "Rome" in texts[3], texts  # "The Eiffel Tower is located in ..."
        first.get_by_role("button", name="Generate").first.click()
        edited = try_output(first)
        assert "Rome" in edited and "Paris" not in edited, edited  # this session's model writes the new fact

    second = new_page(browser)  # another browser context: another session
    with step(second, "edit_other_session"):
        visit(second, server + PAGES["editor"])
        second.get_by_text("No edit yet").wait_for(timeout=120_000)  # this session has no edit
        wait_idle(second)
        second.get_by_role("button", name="Generate").first.click()
        text = try_output(second)
        assert "Paris" in text and "Rome" not in text, text
        assert_no_exception(second)
    first.context.close()
    second.context.close()
