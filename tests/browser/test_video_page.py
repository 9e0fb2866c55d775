"""The Video tab in Chromium: a video uploaded and asked about, the frames the model saw shown with
their timestamps, a rejected file leaving the tab usable."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

ASSETS = Path(__file__).resolve().parents[2] / "assets"
STATS = re.compile(r"⚡ .*tokens")
PLACEHOLDER = "Attach a video and ask about it…"


@pytest.fixture()
def tab(page):
    page.get_by_role("tab", name="Video").click()
    panel = page.get_by_role("tabpanel")
    panel.get_by_text("Sampling settings").click()
    for label, value in (("Max new tokens", 16), ("Max frames", 16)):
        field = panel.get_by_label(f"number input for {label}")
        field.fill(str(value))
        field.press("Enter")
    return panel


def send(tab, question: str, video: Path) -> None:
    tab.locator("input[type=file]").set_input_files(str(video))
    expect(tab.locator(".multimodal-textbox .thumbnail-item")).to_have_count(1)  # uploaded
    box = tab.get_by_placeholder(PLACEHOLDER)
    box.fill(question)
    box.press("Enter")


def test_a_video_is_answered_and_its_sampled_frames_shown(tab, page):
    send(tab, "What happens in this video?", ASSETS / "clock.mp4")
    expect(tab.get_by_text(STATS)).to_have_count(1, timeout=90_000)
    gallery = tab.get_by_test_id("gallery").or_(tab.locator(".gallery-container, .grid-wrap")).first
    expect(gallery.locator("img")).to_have_count(16)  # 8 s at 2 fps, capped by Max frames
    expect(gallery.get_by_text("0.0 s")).to_be_visible()
    expect(gallery.get_by_text("7.5 s")).to_be_visible()
    expect(tab.get_by_placeholder(PLACEHOLDER)).to_be_editable()
    assert page.console_errors == []


def test_a_rejected_video_leaves_the_tab_usable(tab, tmp_path):
    fake = tmp_path / "holiday.mp4"
    fake.write_text("not a video at all")
    send(tab, "What is this?", fake)
    expect(tab.page.get_by_test_id("toast-body").filter(has_text="not a readable video")).to_be_visible(timeout=30_000)
    expect(tab.get_by_test_id("bot")).to_have_count(0)
    tab.locator(".multimodal-textbox .delete-button").click()
    send(tab, "A real one, then.", ASSETS / "clock.mp4")
    expect(tab.get_by_text(STATS)).to_have_count(1, timeout=90_000)
