"""The Chat tab as a person uses it in Chromium: streaming, Stop, refused messages, Retry, Undo,
Edit, Clear and the model switcher."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from ernie_app.turns import MAX_MESSAGE_CHARS


def test_page_loads_without_console_errors(page, chat):
    expect(page.get_by_text("Demo mode")).to_be_visible()
    expect(page.get_by_label("Model")).to_have_value(re.compile(r"ERNIE-4\.5-0\.3B-PT · demo"))
    expect(chat.page.get_by_text("Write a haiku about the sea at night.")).to_be_visible()  # the examples
    page.wait_for_timeout(500)
    assert page.console_errors == []


def test_message_streams_into_the_page(chat):
    chat.settings()
    chat.set_number("Max new tokens", 300)
    chat.send("Hello, who are you?")
    expect(chat.stop_button).to_be_visible()
    expect(chat.page.get_by_test_id("bot")).to_have_count(1, timeout=30_000)
    expect(chat.page.get_by_test_id("bot").first).not_to_contain_text("⏳", timeout=60_000)  # loaded: the reply, not a status
    first = chat.bot_text()
    expect(chat.stats()).to_have_count(1, timeout=60_000)
    final = chat.bot_text()
    assert len(final) > len(first)  # it grew in the page, token by token
    assert chat.user_messages() == ["Hello, who are you?"]
    chat.wait_until_idle()
    assert chat.page.console_errors == []


def test_stop_ends_the_reply_and_keeps_its_statistics(chat, app_server):
    chat.settings()
    chat.set_number("Max new tokens", 4096)
    chat.set_number("Temperature (0 = greedy)", 0)
    chat.send("Write a very long story.")
    expect(chat.page.get_by_test_id("bot")).to_have_count(1, timeout=30_000)
    expect(chat.page.get_by_test_id("bot").first).not_to_contain_text("⏳", timeout=60_000)  # loaded, streaming
    chat.stop_button.click()
    expect(chat.stats()).to_contain_text("stopped", timeout=10_000)
    tokens = int(re.search(r"(\d+) tokens", chat.stats().inner_text()).group(1))
    assert 0 < tokens < 4096
    chat.wait_until_idle(timeout=5_000)
    text = chat.bot_text()
    chat.page.wait_for_timeout(1_000)
    assert chat.bot_text() == text  # nothing streams in after Stop
    chat.set_number("Max new tokens", 20)
    chat.answer_once("And now a short one.")  # the chat goes on


@pytest.mark.parametrize(
    ("message", "notice", "stays_in_box"),
    [
        ("", "Please type a message.", False),
        ("   \n  ", "Please type a message.", False),
        ("x" * (MAX_MESSAGE_CHARS + 2), f"That message has {MAX_MESSAGE_CHARS + 2:,} characters", True),
        ("word " * 20_000, "over the 4,096-token context", True),  # refused by the model, after the check
    ],
    ids=["empty", "spaces", "too-long", "over-context"],
)
def test_a_refused_message_leaves_the_conversation_intact(chat, app_server, message, notice, stays_in_box):
    chat.answer_once("Hello!")
    before_users, before_bot = chat.user_messages(), chat.bot_text()
    log_lines = len(app_server.log().splitlines())
    chat.box.fill(message)
    chat.box.press("Enter") if message.strip() else chat.submit_button.click()
    expect(chat.toast(notice)).to_be_visible(timeout=30_000)
    chat.wait_until_idle(timeout=10_000)
    assert chat.user_messages() == before_users and chat.bot_text() == before_bot
    chat.assert_no_error_badge()
    expect(chat.box).to_have_value(message if stays_in_box else "")
    chat.answer_once("Still here?")  # usable at once
    assert chat.user_messages() == [*before_users, "Still here?"]
    new_log = app_server.log().splitlines()[log_lines:]
    assert not any("Traceback" in line for line in new_log)
    assert sum("refused" in line for line in new_log) == 1  # one line per refusal


def test_retry_undo_edit_and_clear(chat):
    chat.settings()
    chat.set_number("Max new tokens", 40)
    chat.answer_once("First question")
    chat.answer_once("Second question")
    assert chat.user_messages() == ["First question", "Second question"]

    last_reply = chat.page.get_by_test_id("bot").last
    first_answer = last_reply.inner_text()
    chat.page.get_by_label("Retry").last.click()
    expect(last_reply).not_to_have_text(first_answer, timeout=30_000)  # sampled anew
    expect(chat.stats()).to_have_count(2, timeout=60_000)
    chat.wait_until_idle()
    assert chat.user_messages() == ["First question", "Second question"]

    chat.page.get_by_label("Undo").last.click()
    expect(chat.page.get_by_test_id("user")).to_have_count(1)
    expect(chat.box).to_have_value("Second question")  # back in the box, to edit and resend

    chat.page.get_by_test_id("user").first.hover()
    chat.page.get_by_label("Edit").first.click()
    editor = chat.chat.locator("textarea")
    editor.fill("An edited first question")
    first_reply = chat.bot_text()
    chat.chat.get_by_role("button", name="Submit").click()
    expect(chat.page.get_by_test_id("bot").first).not_to_have_text(first_reply, timeout=30_000)  # answered anew
    expect(chat.stats()).to_have_count(1, timeout=60_000)
    chat.wait_until_idle()
    assert chat.user_messages() == ["An edited first question"]

    chat.page.get_by_label("Clear").click()
    expect(chat.page.get_by_test_id("user")).to_have_count(0)
    expect(chat.page.get_by_text("Ask ERNIE anything.")).to_be_visible()
    chat.answer_once("A fresh start")
    assert chat.page.console_errors == []


def test_model_switcher_updates_the_sampling_sliders(chat):
    chat.settings()
    temperature = chat.page.get_by_label("number input for Temperature (0 = greedy)")
    top_p = chat.page.get_by_label("number input for Top-p")
    expect(temperature).to_have_value("0.8")
    model = chat.page.get_by_label("Model")
    model.click()
    chat.page.get_by_role("option", name=re.compile("Thinking")).click()
    expect(temperature).to_have_value("0.6")
    expect(top_p).to_have_value("0.95")
    model.click()
    chat.page.get_by_role("option", name=re.compile("0.3B")).click()
    expect(temperature).to_have_value("0.8")


def test_thinking_model_shows_reasoning_and_says_when_no_answer_came(chat):
    model = chat.page.get_by_label("Model")
    model.click()
    chat.page.get_by_role("option", name=re.compile("Thinking")).click()
    chat.settings()
    # The switch sets the sliders to the thinking model's settings; set ours after that, not before.
    expect(chat.page.get_by_label("number input for Temperature (0 = greedy)")).to_have_value("0.6")
    expect(chat.page.get_by_label("number input for Max new tokens")).to_have_value("512")  # its budget, set too
    chat.set_number("Max new tokens", 12)
    expect(chat.page.get_by_label("number input for Max new tokens")).to_have_value("12")
    chat.answer_once("Think hard")
    expect(chat.chat.get_by_text("💭 Reasoning")).to_be_visible()
    expect(chat.chat.get_by_text(re.compile("No answer yet"))).to_be_visible()
    expect(chat.stats()).to_contain_text("max new tokens reached")
