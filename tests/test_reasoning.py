"""Parsing -Thinking model output into reasoning and answer (the shapes vLLM's ernie45 parser handles)."""
from __future__ import annotations

import pytest

from ernie_app.turns import NO_ANSWER, conversation, render
from ernie_app.engine import Reply
from ernie_app.reasoning import split_reasoning


@pytest.mark.parametrize(
    ("text", "reasoning", "answer", "done"),
    [
        ("Let me think", "Let me think", "", False),  # still thinking, no opening tag
        ("<think>\nstep 1\nstep 2", "step 1\nstep 2", "", False),
        ("plan\n</think>\n\nThe answer is 4.", "plan", "The answer is 4.", True),
        ("<think>plan</think>\n<response>\nHi 你好\n</response>\n", "plan", "Hi 你好", True),
        ("plan</think>\n<resp", "plan", "", True),  # half-streamed wrapper tag
        ("a</think>b</think>c", "a", "b</think>c", True),  # only the first closing tag splits
    ],
)
def test_split_reasoning(text, reasoning, answer, done):
    split = split_reasoning(text)
    assert (split.reasoning, split.answer, split.thinking_done) == (reasoning, answer, done)


def test_reasoning_is_shown_collapsed_and_never_sent_back():
    reply = Reply(text="why\n</think>\n<response>Because.</response>", new_tokens=9, stop_reason="eos")
    shown = render(reply, thinking=True)
    assert shown[0]["metadata"]["title"] == "💭 Reasoning" and shown[0]["content"] == "why"
    assert shown[1]["content"] == "Because." and not shown[1]["metadata"]
    assert "end of answer" in shown[2]["metadata"]["title"]
    history = [{"role": "user", "content": "Q"}, *shown]
    assert conversation(history, "Be brief.", "Next?") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "Because."},
        {"role": "user", "content": "Next?"},
    ]


@pytest.mark.parametrize("reason", ["max_new_tokens", "cancelled", "eos"])
def test_reasoning_without_an_answer_says_so(reason):
    shown = render(Reply(text="still thinking about it", new_tokens=20, stop_reason=reason), thinking=True)
    assert [m["metadata"]["title"] for m in shown][:2] == ["💭 Reasoning", f"ℹ️ {NO_ANSWER[reason]}"]
    assert shown[2]["metadata"]["title"].startswith("⚡")
    sent = conversation([{"role": "user", "content": "Q"}, *shown], "", "Next?")
    assert sent == [{"role": "user", "content": "Q"}, {"role": "user", "content": "Next?"}]  # the note stays on screen
