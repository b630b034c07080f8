"""Driving the app's page in headless Chromium (Playwright + Debian's ``chromium``): the browser test
and the click-latency benchmark share these steps.

Chromium is Debian's package (``apt-get install chromium``; ``.ci/run`` installs it when missing),
found at ``$SAMANTICS_CHROMIUM`` or ``/usr/bin/chromium``; Playwright never downloads a browser.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from typing import Iterator, Optional

__all__ = ["CHROMIUM_FLAGS", "chromium_path", "click_image", "free_port", "open_page", "serve"]

# Headless, no background traffic: this machine's closed network refuses it (ENVIRONMENT.md).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """Debian's Chromium; a clear error when it is not installed."""
    path = os.environ.get("SAMANTICS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Chromium not found ({path}): install Debian's package (`sudo apt-get install chromium`; .ci/run does it) "
            "or set SAMANTICS_CHROMIUM to a Chromium/Chrome executable.")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(blocks, *, max_file_size: Optional[str] = None) -> Iterator[str]:
    """Serve ``blocks`` on a free loopback port for the duration of the block; yields its URL."""
    port = free_port()
    blocks.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size=max_file_size)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


@contextlib.contextmanager
def open_page(url: str, *, width: int = 1400, height: int = 1000):
    """A Playwright page on ``url`` in headless Chromium, once the page shows its tabs."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.get_by_role("tab", name="Click").wait_for(timeout=60_000)
            yield page
        finally:
            browser.close()


def click_image(page, selector: str, x: float, y: float, *, image_size: tuple[int, int]) -> None:
    """Click pixel ``(x, y)`` of the image (``image_size`` = (width, height)) shown in ``selector``."""
    img = page.locator(f"{selector} img").first
    img.wait_for(timeout=30_000)
    box = img.bounding_box()
    page.mouse.click(box["x"] + (x + 0.5) * box["width"] / image_size[0],
                     box["y"] + (y + 0.5) * box["height"] / image_size[1])


def wait_for_text(page, selector: str, text: str, *, timeout_s: float = 120.0) -> float:
    """Wait until ``text`` appears in ``selector``; returns the seconds waited."""
    start = time.perf_counter()
    element = page.locator(selector).first
    while text not in element.inner_text():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"{text!r} did not appear in {selector} within {timeout_s} s; it shows "
                               f"{element.inner_text()[:300]!r}.")
        page.wait_for_timeout(50)
    return time.perf_counter() - start


def click_latency(page, *, image_file: str, point: tuple[float, float], image_size: tuple[int, int],
                  repeats: int = 5) -> list[float]:
    """Seconds from a click on the Click tab's image to its masks' captions on screen, ``repeats``
    times (the clicks are cleared in between; the first click also encodes the image)."""
    page.get_by_role("tab", name="Click").click()
    page.locator("#click-target input[type=file]").set_input_files(image_file)
    times = []
    for _ in range(repeats):
        page.get_by_role("button", name="Clear clicks").click()
        wait_for_text(page, "#click-status", "Clicks cleared")
        start = time.perf_counter()
        click_image(page, "#click-target", point[0], point[1], image_size=image_size)
        wait_for_text(page, "#click-status", "masks for 1 click(s)")
        times.append(time.perf_counter() - start)
    return times
