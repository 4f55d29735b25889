"""Headless Debian chromium through playwright, as the browser tests drive it: a page that collects console
errors, page errors and any request outside the origins a test allows (the pages must work offline)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def browser_page(profile: Path, allowed: tuple[str, ...]) -> Iterator[tuple[Any, list[str]]]:
    """(page, errors): `errors` gathers what the page logged as an error and every request to another origin."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=ARGS, viewport={"width": 1300, "height": 900}
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: None if req.url.startswith(allowed) else errors.append(f"request {req.url}"))
            yield page, errors
        finally:
            browser.close()
