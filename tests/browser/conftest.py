"""The real-browser suite: Debian's Chromium, driven by Playwright, against `python app.py --demo`.

Chromium is launched by executable path (never `playwright install`, which downloads a browser).
Every test leaves a screenshot of its final page under artifacts/browser/ (or
$ERNIE_STUDIO_ARTIFACTS); the server's log sits beside them.
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

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("ERNIE_STUDIO_ARTIFACTS") or ROOT / "artifacts" / "browser")
VIEWPORT = {"width": 1280, "height": 1000}


def chromium_executable() -> str | None:
    candidates = [os.environ.get("CHROMIUM", ""), "/usr/bin/chromium", "/usr/bin/chromium-browser"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None) or shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python app.py --demo` on a free local port, its output kept in a log file."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "app.py", "--demo", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"app.py did not answer within 120 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = chromium_executable()
    if path is None:
        message = "Chromium not found: install Debian's `chromium` package (or set CHROMIUM=/path/to/chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it (.ci/run): its absence there is a fault
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def app_server():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = Server(ARTIFACTS / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, app_server, request):
    """A fresh tab on the app, its console errors collected in `page.console_errors`; the final
    page is saved as artifacts/browser/<test>.png."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda message: page.console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    page.goto(app_server.url)
    page.get_by_placeholder("Message ERNIE…").wait_for()
    yield page
    name = request.node.name.replace("/", "_").replace("[", "-").rstrip("]")
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    context.close()
