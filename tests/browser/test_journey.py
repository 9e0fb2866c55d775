"""One visit in one page session, as a person makes it: every tab in turn (Chat, Image, Video,
Multilingual classification), then back to the chat, whose history must still be there; on the way,
a file over the upload limit and a file of the wrong type, each refused with a notice in the page.
Screenshots of every stage go to artifacts/browser/journey-*.png."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

ASSETS = Path(__file__).resolve().parents[2] / "assets"
UPLOAD_LIMIT_MB = 1
LABELS = ["política", "deportes", "cocina"]


@pytest.fixture(scope="module")
def app_server(start_server):
    """This module's own server, with a 1 MB upload limit, so that a 2 MB file is refused."""
    server = start_server("journey-server.log", "--max-upload-mb", str(UPLOAD_LIMIT_MB))
    yield server
    server.stop()


def legible(notice: Locator) -> None:
    """Wait until a notice has faded in fully, so that a screenshot shows it readably."""
    expect(notice).to_be_visible()
    notice.page.wait_for_function(
        "e => { for (; e; e = e.parentElement) if (getComputedStyle(e).opacity !== '1') return false; return true; }",
        arg=notice.element_handle(),
    )


def dismiss_notices(page: Page) -> None:
    """Close the notices on show, as a person would (each also closes itself after 10 s)."""
    page.get_by_test_id("toast-close").evaluate_all("buttons => buttons.forEach(b => b.click())")
    expect(page.get_by_test_id("toast-body")).to_have_count(0)


def test_a_visit_through_every_tab(page, chat, open_tab, screenshot, tmp_path):
    chat.settings()
    chat.set_number("Max new tokens", 120)
    chat.set_number("Temperature (0 = greedy)", 0)  # the same long reply every time: it streams for a while
    chat.send("Hello! What should I see in Beijing in one day?")
    expect(chat.stop_button).to_be_visible()  # streaming
    expect(chat.panel.get_by_test_id("bot").first).not_to_contain_text("⏳", timeout=60_000)  # loaded
    first = chat.bot_text()
    expect(chat.stats()).to_have_count(1, timeout=60_000)
    chat.wait_until_idle()
    first_reply = chat.bot_text()
    assert len(first_reply) > len(first)  # it grew in the page
    expect(chat.stats()).to_contain_text("120 tokens · max new tokens reached")  # the settings held
    screenshot("journey-1-chat")

    image = open_tab("Image")
    image.settings()
    image.set_number("Max new tokens", 24)
    too_large = tmp_path / "poster.png"
    too_large.write_bytes(os.urandom(2 * 2**20))
    image.upload(too_large)
    legible(image.toast(f'exceed the maximum allowed size of {UPLOAD_LIMIT_MB}.0 Mb: "poster.png"'))
    expect(image.attached).to_have_count(0)
    screenshot("journey-2-image-too-large")
    dismiss_notices(page)
    image.attach(ASSETS / "shapes.png")
    image.answer_once("What is shown in this picture?")
    expect(image.chat.locator("img")).to_have_count(1)
    screenshot("journey-3-image")

    video = open_tab("Video")
    video.settings()
    video.set_number("Max new tokens", 16)
    video.set_number("Max frames", 16)
    video.upload(ASSETS / "chart.png")
    legible(video.toast("Invalid file type: chart.png. Only video allowed."))
    expect(video.attached).to_have_count(0)
    screenshot("journey-4-video-wrong-type")
    dismiss_notices(page)
    video.attach(ASSETS / "clock.mp4")
    video.answer_once("What happens in this video?", timeout=90_000)
    expect(video.frames.locator("img")).to_have_count(16)
    expect(video.frames.get_by_text("7.5 s")).to_be_visible()
    screenshot("journey-5-video")

    page.get_by_role("tab", name="Multilingual classification").click()
    page.get_by_label("Text (any language)").fill("El gobierno aprobó una nueva ley de educación ayer.")
    page.get_by_label("Labels (comma separated, any language)").fill(", ".join(LABELS))
    page.get_by_role("button", name="Classify").click()
    for label in LABELS:
        expect(page.get_by_test_id(f"{label}-confidence-set")).to_be_visible(timeout=60_000)
    expect(page.locator(".vega-embed")).to_be_visible()
    screenshot("journey-6-classify")

    open_tab("Chat")
    assert chat.user_messages() == ["Hello! What should I see in Beijing in one day?"]
    assert chat.bot_text() == first_reply
    chat.set_number("Max new tokens", 40)
    chat.answer_once("And in the evening?")
    assert chat.user_messages() == ["Hello! What should I see in Beijing in one day?", "And in the evening?"]
    assert chat.bot_text() == first_reply  # the first reply stays as it was
    screenshot("journey-7-chat-again")
    assert page.console_errors == []
