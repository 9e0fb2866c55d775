"""The Image tab in Chromium: images uploaded and asked about, a follow-up question about them, a
rejected file leaving the tab usable."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture()
def tab(open_tab):
    tab = open_tab("Image")
    tab.settings()
    tab.set_number("Max new tokens", 24)
    return tab


def test_images_are_answered_and_follow_ups_see_them(tab, page):
    tab.attach(ASSETS / "shapes.png", ASSETS / "chart.png")
    tab.answer_once("What is in these pictures?")
    expect(tab.chat.locator("img")).to_have_count(2)  # both images shown in the conversation
    tab.answer_once("And which colours do you see?")
    expect(tab.chat.get_by_test_id("user").filter(has_text="And which colours do you see?")).to_have_count(1)
    expect(tab.chat.locator("img")).to_have_count(2)  # the follow-up keeps the images
    assert page.console_errors == []


def test_a_rejected_file_leaves_the_tab_usable(tab, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("not an image at all")
    tab.attach(fake)
    tab.send("What is this?")
    expect(tab.toast(re.compile("image", re.I))).to_be_visible(timeout=30_000)
    expect(tab.panel.get_by_test_id("bot")).to_have_count(0)  # nothing half-answered left behind
    expect(tab.box).to_be_editable()
    tab.panel.locator(".multimodal-textbox .delete-button").click()  # the refused file stays attached, to remove
    tab.attach(ASSETS / "shapes.png")
    tab.answer_once("A real one, then.")
