"""Headless Chromium for the tests and benchmarks that open pages (Debian's `chromium`; `make test`
installs it)."""

from __future__ import annotations

import shutil

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--force-device-scale-factor=1"]


def chromium() -> str:
    """The chromium executable (a test needing it fails with the way to install it)."""
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is needed for this test: `make test` installs it (apt-get install chromium)"
    return exe
