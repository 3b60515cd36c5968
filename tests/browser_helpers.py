"""What the Chromium tests share: Debian's Chromium (never a downloaded one), `ctxaudit ui`
on a free port reading a running serve, and screenshots under test-artifacts/."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
NEEDS_CHROMIUM = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Chromium is installed by `make test` (apt-get)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def explorer_on(api_url: str, timeout_s: float = 60) -> Iterator[str]:
    """`ctxaudit ui --server API_URL` on a free port; its base URL once it answers."""
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "audit", "ui", "--server", api_url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).close()
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "ctxaudit ui did not start"
                time.sleep(0.5)
        yield url
    finally:
        ui.terminate()
        ui.wait(30)


@contextlib.contextmanager
def chromium():
    """A headless Debian Chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def shot(page, folder: str, name: str) -> None:
    out = ARTIFACTS / folder
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
