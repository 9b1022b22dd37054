"""Headless Chromium for the browser tests: one for the whole session, shared by every test file
that drives the staff UI (tests/test_browser_*.py); each test opens its own context.

Debian's `chromium` (installed by .ci/run), never `playwright install`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.net import require_program

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        require_program("chromium")  # skips on a laptop without it, fails under CI=true
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the test code itself stays synchronous.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()
    playwright.stop()
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous
