"""The running turn of each browser session: Stop, Clear and a newer turn of the same session."""
from __future__ import annotations

from ernie_app.engine import Reply
from ernie_app.turns import RunningTurns, Turn

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
