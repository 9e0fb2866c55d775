"""The Video tab in Chromium: a video uploaded and asked about, the frames the model saw shown with
their timestamps, a rejected file leaving the tab usable."""
from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture()
def tab(open_tab):
    tab = open_tab("Video")
    tab.settings()
    tab.set_number("Max new tokens", 16)
    tab.set_number("Max frames", 16)
    return tab


def test_a_video_is_answered_and_its_sampled_frames_shown(tab, page):
    tab.attach(ASSETS / "clock.mp4")
    tab.answer_once("What happens in this video?", timeout=90_000)
    expect(tab.frames.locator("img")).to_have_count(16)  # 8 s at 2 fps, capped by Max frames
    expect(tab.frames.get_by_text("0.0 s")).to_be_visible()
    expect(tab.frames.get_by_text("7.5 s")).to_be_visible()
    assert page.console_errors == []


def test_a_rejected_video_leaves_the_tab_usable(tab, tmp_path):
    fake = tmp_path / "holiday.mp4"
    fake.write_text("not a video at all")
    tab.attach(fake)
    tab.send("What is this?")
    expect(tab.toast("not a readable video")).to_be_visible(timeout=30_000)
    expect(tab.panel.get_by_test_id("bot")).to_have_count(0)
    tab.panel.locator(".multimodal-textbox .delete-button").click()
    tab.attach(ASSETS / "clock.mp4")
    tab.answer_once("A real one, then.", timeout=90_000)
