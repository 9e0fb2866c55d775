"""The Image tab in Chromium: images uploaded and asked about, a follow-up question about them, a
rejected file leaving the tab usable."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

ASSETS = Path(__file__).resolve().parents[2] / "assets"
STATS = re.compile(r"⚡ .*tokens")


@pytest.fixture()
def tab(page):
    page.get_by_role("tab", name="Image").click()
    panel = page.get_by_role("tabpanel")
    panel.get_by_text("Sampling settings").click()
    tokens = panel.get_by_label("number input for Max new tokens")
    tokens.fill("24")
    tokens.press("Enter")
    return panel


def ask(tab, question: str, files: list[Path] = ()) -> None:
    answered = tab.get_by_text(STATS).count()
    if files:
        tab.locator("input[type=file]").set_input_files([str(f) for f in files])
        expect(tab.locator(".multimodal-textbox .thumbnail-item")).to_have_count(len(files))  # uploaded
    box = tab.get_by_placeholder("Attach images and ask about them…")
    box.fill(question)
    box.press("Enter")
    expect(tab.get_by_text(STATS)).to_have_count(answered + 1, timeout=60_000)
    expect(box).to_be_editable()


def test_images_are_answered_and_follow_ups_see_them(tab, page):
    ask(tab, "What is in these pictures?", [ASSETS / "shapes.png", ASSETS / "chart.png"])
    chat = tab.get_by_label("chatbot conversation")
    expect(chat.locator("img")).to_have_count(2)  # both images shown in the conversation
    ask(tab, "And which colours do you see?")
    expect(chat.get_by_test_id("user").filter(has_text="And which colours do you see?")).to_have_count(1)
    expect(chat.locator("img")).to_have_count(2)  # the follow-up keeps the images
    assert page.console_errors == []


def test_a_rejected_file_leaves_the_tab_usable(tab, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("not an image at all")
    tab.locator("input[type=file]").set_input_files(str(fake))
    expect(tab.locator(".multimodal-textbox .thumbnail-item")).to_have_count(1)
    box = tab.get_by_placeholder("Attach images and ask about them…")
    box.fill("What is this?")
    box.press("Enter")
    page = tab.page
    expect(page.get_by_test_id("toast-body").filter(has_text=re.compile("image", re.I))).to_be_visible(timeout=30_000)
    expect(tab.get_by_test_id("bot")).to_have_count(0)  # nothing half-answered left behind
    expect(box).to_be_editable()
    tab.locator(".multimodal-textbox .delete-button").click()  # the refused file stays attached, to remove
    ask(tab, "A real one, then.", [ASSETS / "shapes.png"])
