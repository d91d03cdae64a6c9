"""Time the app in headless Chromium: the first page after a warm start, and a single-fact trace of all three
kinds (default samples) through the Trace explorer, with each heat map's arrival and the progress bar's values.

    PYTHONPATH=. .venv/bin/python bench/app.py [--samples 10] [--prompt "..."]

"Warm start": the embedded model's safetensors cache exists (any earlier run made it); the server process is new.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--shots", default=None, help="folder for screenshots of the finished pages")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        started = time.perf_counter()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "app.py",
                "--server.port",
                str(port),
                "--server.headless",
                "true",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.1)
            healthy = time.perf_counter() - started
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(url)
            page.locator("h1").first.wait_for(timeout=120_000)
            title = time.perf_counter() - started
            page.get_by_text("Hidden size").first.wait_for(timeout=120_000)
            card = time.perf_counter() - started
            print(f"warm start: server healthy {healthy:.1f} s, home title {title:.1f} s, model card {card:.1f} s")
            if args.shots:
                page.screenshot(path=f"{args.shots}/home.png", full_page=True)

            page.goto(url + "/Trace_explorer")
            prompt = page.get_by_label("Prompt", exact=True)
            prompt.wait_for(timeout=60_000)
            if prompt.input_value() != args.prompt:
                prompt.fill(args.prompt)
                prompt.press("Enter")
                page.wait_for_timeout(1000)
            samples = page.get_by_label("Samples", exact=True)
            samples.fill(str(args.samples))
            samples.press("Enter")
            page.wait_for_timeout(1000)
            clicked = time.perf_counter()
            page.get_by_role("button", name="Trace", exact=True).click()
            charts = page.locator('[data-testid="stVegaLiteChart"]')
            seen, arrivals = [], []
            while len(arrivals) < 3 and time.perf_counter() - clicked < 1200:
                bar = page.locator('[data-testid="stProgress"] [role="progressbar"]')
                if bar.count():
                    value = bar.first.get_attribute("aria-valuenow")
                    if value is not None and (not seen or seen[-1] != value):
                        seen.append(value)
                if charts.count() > len(arrivals):
                    arrivals.append(time.perf_counter() - clicked)
                page.wait_for_timeout(200)
            page.get_by_text("p(answer), clean").wait_for(timeout=60_000)
            total = time.perf_counter() - clicked
            print(
                f"trace of 3 kinds, {args.samples} samples: heat maps at "
                + ", ".join(f"{t:.1f} s" for t in arrivals)
                + f"; result shown at {total:.1f} s"
            )
            print(f"progress bar values seen ({len(seen)}): {', '.join(seen[:40])}")
            if args.shots:
                page.wait_for_timeout(2000)
                page.screenshot(path=f"{args.shots}/trace_full.png", full_page=True)
        finally:
            server.terminate()
            server.wait(timeout=20)
            browser.close()


if __name__ == "__main__":
    main()
