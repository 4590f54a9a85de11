"""Browser-test helpers: Debian's chromium driven through Playwright, console problems collected.

The dashboard (src/crowdtrain/server/static) is plain HTML + JS; its tests load it in a real
headless chromium. The browser is the system's /usr/bin/chromium (never a Playwright download).
A test module calls `skip_unless_chromium()` at import time so that it is skipped, with a
reason, on machines that lack Playwright or chromium; where CROWDTRAIN_REQUIRE_BROWSER is set
(`.ci/run` sets it) a missing browser fails the run instead.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Error, Page, ViewportSize

CHROMIUM = os.environ.get("CROWDTRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}


def chromium_missing() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    if not os.path.exists(CHROMIUM):
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def skip_unless_chromium() -> None:
    """Skip the calling test module when Playwright or chromium is unavailable."""
    reason = chromium_missing()
    if reason is not None and os.environ.get("CROWDTRAIN_REQUIRE_BROWSER"):
        pytest.fail(f"the browser tests must run here (CI), but {reason}", pytrace=False)
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)


@contextmanager
def chromium_browser() -> Iterator[Browser]:
    """A headless chromium, closed on exit (launch once per module: it takes about a second)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def chromium_page(browser: Browser | None = None) -> Iterator[tuple[Page, list[str]]]:
    """A fresh page (own context: own cookies and sessionStorage) and the list that collects
    its console errors and warnings, its uncaught page errors and any dialog it opens (dismissed),
    as "kind: text" strings.

    With no `browser`, one is launched for this page alone.
    """
    if browser is None:
        with chromium_browser() as own, chromium_page(own) as pair:
            yield pair
        return
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            errors.append(f"console {message.type}: {message.text}")

    def on_page_error(error: Error) -> None:
        errors.append(f"page error: {error.message}")

    def on_dialog(dialog: Dialog) -> None:
        # The dashboard never opens dialogs; one means injected script ran (or a regression).
        errors.append(f"dialog {dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    page.on("dialog", on_dialog)
    try:
        yield page, errors
    finally:
        context.close()
