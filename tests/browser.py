"""Headless Chromium for the tests and benchmarks that open pages (Debian's `chromium`; `make test`
installs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

SHOTS = Path(__file__).resolve().parent / "screenshots"  # what a person looks at after the browser tests

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--force-device-scale-factor=1"]


def chromium() -> str:
    """The chromium executable (a test needing it fails with the way to install it)."""
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is needed for this test: `make test` installs it (apt-get install chromium)"
    return exe


def open_page(page, url: str, shot: str | None = None):
    """Open an explorer page and wait for its script to finish; with `shot`, save a screenshot of it."""
    response = page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    if shot:
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{shot}.png"), full_page=True)
    return response
