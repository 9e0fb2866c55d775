"""The running turn of each browser session (Stop, Clear, a newer turn of the same session), the
caps on what a client sends, and the history a session keeps."""
from __future__ import annotations

import pytest

from ernie_app.conversation import ChatSession, Limits, api_stream
from ernie_app.engine import Reply, UserError
from ernie_app.manager import ModelManager
from ernie_app.turns import (MAX_HISTORY_MESSAGES, RunningTurns, SessionLimit, Turn, check_conversation, conversation,
                             drop_oldest, render)

USER = [{"role": "user", "content": "Q"}]


def test_stop_cancels_and_keeps_the_statistics_with_the_reason_stopped():
    running, turn = RunningTurns(), Turn(list(USER), thinking=False)
    with running.track("session", turn):
        turn.reply = Reply(text="partial answer", new_tokens=7)
        assert running.stop("other-session") is None
        assert running.stop("session") is turn
        shown = turn.stopped()
    assert turn.cancel.is_set() and not turn.discarded
    assert shown[:2] == [USER[0], {"role": "assistant", "content": "partial answer", "metadata": {}}]
    assert shown[2]["metadata"]["title"].endswith("7 tokens · stopped")
    assert turn.reply.stop_reason is None  # the generator's own reply is left to finish by itself
    assert running.stop("session") is None  # finished turns are forgotten


def test_clear_and_a_newer_turn_discard_the_running_one():
    running, first, second = RunningTurns(), Turn(list(USER), False), Turn(list(USER), False)
    with running.track("s", first):
        with running.track("s", second):
            assert first.cancel.is_set() and first.discarded and not second.cancel.is_set()
            running.stop("s", discard=True)
            assert second.cancel.is_set() and second.discarded
        assert running.stop("s") is None  # the outer block ending does not resurrect the first


def test_a_discard_outdates_turns_accepted_before_it():
    running = RunningTurns()
    accepted = running.epoch("s")
    running.stop("s")  # Stop alone keeps waiting turns valid
    assert running.epoch("s") == accepted
    running.stop("s", discard=True)  # Clear while a turn waited in the queue
    assert running.epoch("s") != accepted and running.epoch("other") == 0


def answered(question: str, answer: str, thinking: bool = False) -> list[dict]:
    reply = Reply(text=f"<think>hmm</think>{answer}" if thinking else answer, new_tokens=3, stop_reason="eos")
    return [{"role": "user", "content": question}, *render(reply, thinking)]


def test_drop_oldest_removes_whole_model_messages_with_their_display_entries():
    history = [*answered("q1", "a1", thinking=True), *answered("q2", "a2"), *answered("q3", "a3", thinking=True)]
    model = conversation(history, "", "new")
    assert [m["content"] for m in model] == ["q1", "a1", "q2", "a2", "q3", "a3", "new"]
    for count in range(7):
        kept = drop_oldest(history, count)
        assert conversation(kept, "", "new") == model[count:]
        assert not kept or kept[0]["role"] == "user" or count % 2  # no stray reasoning or statistics at the head
    assert drop_oldest(history, 0) is history


def test_history_and_system_prompt_caps():
    check_conversation(answered("q", "a") * 10, "short")
    with pytest.raises(UserError, match="system prompt has 20,001 characters"):
        check_conversation([], "x" * 20_001)
    with pytest.raises(UserError, match="too long to go on"):
        check_conversation([{"role": "user", "content": "q"}] * (MAX_HISTORY_MESSAGES + 1), "")
    with pytest.raises(UserError, match="too long to go on"):
        check_conversation([{"role": "user", "content": "q" * 1_000_001}] * 2, "")
    with pytest.raises(UserError, match="list of"):
        check_conversation(["not a message"], "")


def test_session_limit_counts_each_session_apart_and_frees_on_exit():
    limit = SessionLimit(2)
    with limit.hold("a"), limit.hold("a"):
        with pytest.raises(UserError, match="already have 2 requests running"):
            with limit.hold("a"):
                pass
        with limit.hold("b"):
            pass
    with limit.hold("a"), limit.hold("a"):
        pass


def test_an_api_session_keeps_only_the_turns_that_still_fit(demo_registry, demo_names):
    session = ChatSession(ModelManager(demo_registry), Limits(max_context=400))
    history: list[dict] = []
    for turn in range(8):
        question = f"question {turn}: " + "the sea and the moon " * 12
        *_, (reply, history) = api_stream(session, history, question, demo_names[0], "", (6, 0.0, None, None, None, None, ""),
                                          "/chat", "user")
        model = conversation(history, "", "next")
        assert model[-3]["content"] == question  # the new turn is always kept
    assert 2 <= len(conversation(history, "", "next")) < 2 * 8  # the oldest turns were dropped from the state
