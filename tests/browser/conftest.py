"""The real-browser suite: Debian's Chromium, driven by Playwright, against `python app.py --demo`.

Chromium is launched by executable path (never `playwright install`, which downloads a browser).
Every test leaves a screenshot of its final page under artifacts/browser/ (or
$ERNIE_STUDIO_ARTIFACTS); the server's log sits beside them. `ConversationTab` is what the Chat,
Image and Video tabs' tests (and the journey through all tabs) touch.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("ERNIE_STUDIO_ARTIFACTS") or ROOT / "artifacts" / "browser")
VIEWPORT = {"width": 1280, "height": 1000}
STATS = re.compile(r"⚡ .*tokens")
PLACEHOLDERS = {"Chat": "Message ERNIE…", "Image": "Attach images and ask about them…",
                "Video": "Attach a video and ask about it…"}


def chromium_executable() -> str | None:
    candidates = [os.environ.get("CHROMIUM", ""), "/usr/bin/chromium", "/usr/bin/chromium-browser"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None) or shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python app.py --demo` (plus `args`) on a free local port, its output kept in a log file."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "app.py", "--demo", "--host", "127.0.0.1", "--port", str(self.port), *args],
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
def start_server():
    """Start `python app.py --demo` with more arguments, its log in artifacts/browser/<log_name>
    (for a module that overrides `app_server`); the caller stops it."""
    def start(log_name: str, *args: str) -> Server:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        return Server(ARTIFACTS / log_name, *args)
    return start


@pytest.fixture(scope="session")
def app_server(start_server):
    server = start_server("server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser(chromium_path):
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
    page.get_by_placeholder(PLACEHOLDERS["Chat"]).wait_for()
    yield page
    save_screenshot(page, request.node.name.replace("/", "_").replace("[", "-").rstrip("]"))
    context.close()


def save_screenshot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture()
def screenshot(page):
    """Save the page now as artifacts/browser/<name>.png, for a test that shows several stages."""
    return lambda name: save_screenshot(page, name)


@pytest.fixture()
def chat(page) -> ConversationTab:
    """The Chat tab, on show when the page opens."""
    return ConversationTab(page)


@pytest.fixture()
def open_tab(page):
    """Switch to a conversation tab by name ("Chat", "Image", "Video") and return it."""
    def open_(name: str) -> ConversationTab:
        page.get_by_role("tab", name=name, exact=True).click()
        tab = ConversationTab(page, PLACEHOLDERS[name])
        expect(tab.box).to_be_visible()  # its panel is the one on show: the tab's locators find its widgets
        settle(page)
        return tab
    return open_


def settle(page: Page) -> None:
    """Wait two frames. Gradio draws the widgets of a tab or accordion shown for the first time, then
    a frame later sets them to their initial values, undoing whatever was typed in between."""
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


class ConversationTab:
    """What a person sees and touches on a conversation tab (Chat, Image, Video). Locators look
    inside the tab on show: a tab once visited stays in the page, hidden, with its own chat."""

    def __init__(self, page: Page, placeholder: str = PLACEHOLDERS["Chat"]) -> None:
        self.page = page
        self.panel = page.get_by_role("tabpanel")
        self.box = self.panel.get_by_placeholder(placeholder)
        self.chat = self.panel.get_by_label("chatbot conversation")
        self.submit_button = self.panel.get_by_test_id("submit-button")
        self.stop_button = self.panel.locator("button.stop-button")
        self.attached = self.panel.locator(".multimodal-textbox .thumbnail-item")
        self.frames = self.panel.get_by_test_id("gallery").or_(self.panel.locator(".gallery-container, .grid-wrap")).first

    def upload(self, *files: Path) -> None:
        """Hand files to the input box's file picker (the page may refuse them)."""
        self.panel.locator("input[type=file]").set_input_files([str(f) for f in files])

    def attach(self, *files: Path) -> None:
        """Upload files and wait until the input box shows them attached."""
        self.upload(*files)
        expect(self.attached).to_have_count(len(files))

    def send(self, text: str) -> None:
        self.box.fill(text)
        self.box.press("Enter")

    def user_messages(self) -> list[str]:
        return [m.inner_text().strip() for m in self.panel.get_by_test_id("user").all()]

    def bot_text(self) -> str:
        return self.panel.get_by_test_id("bot").first.inner_text()

    def stats(self):
        return self.chat.get_by_text(STATS)

    def wait_until_idle(self, timeout: float = 60_000) -> None:
        """Until the reply has finished and the input box takes a new message."""
        expect(self.submit_button).to_be_visible(timeout=timeout)
        expect(self.box).to_be_editable()

    def settings(self) -> None:
        """Open the sampling settings, ready to be changed."""
        self.panel.get_by_text("Sampling settings").click()
        expect(self.panel.get_by_label("number input for Max new tokens")).to_be_visible()
        settle(self.page)

    def set_number(self, label: str, value: float) -> None:
        """Type a slider's value, and wait until the slider itself holds it."""
        field = self.panel.get_by_label(f"number input for {label}")
        field.fill(str(value))
        field.press("Enter")
        expect(self.panel.get_by_label(f"range slider for {label}")).to_have_value(str(value))

    def answer_once(self, text: str, timeout: float = 60_000) -> None:
        """Send `text` and wait for the whole reply (one more statistics line)."""
        answered = self.stats().count()
        self.send(text)
        expect(self.stats()).to_have_count(answered + 1, timeout=timeout)
        self.wait_until_idle()

    def toast(self, text: str | re.Pattern):
        return self.page.get_by_test_id("toast-body").filter(has_text=text)

    def assert_no_error_badge(self) -> None:
        expect(self.page.get_by_test_id("status-tracker").filter(has_text=re.compile(r"^\s*Error"))).to_have_count(0)
