"""A session's server state is freed when the session ends or goes idle (Gradio would keep it
until 10,000 newer sessions had come: ~0.3 MB each, see BENCHMARKS.md "Load")."""
from __future__ import annotations

import datetime
import time

import pytest
from gradio_client import Client

from bench.bench_load import fresh_session, free_port
from ernie_app.manager import ModelManager
from ernie_app.ui import build_app, forget_idle_sessions


@pytest.fixture(scope="module")
def app(demo_registry, demo_names):
    app = build_app(ModelManager(demo_registry, max_concurrency=2), demo_names[0], notice="Demo mode").queue()
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield app
    app.close()


def test_an_ended_session_is_forgotten(app):
    client = Client(app.local_url, verbose=False)
    with fresh_session(client):  # its heartbeat ends as the block does, as when a tab closes
        client.predict("hello", max_new_tokens=4, api_name="/chat")
        session = client.session_hash
        assert session in app.state_holder.session_data
    deadline = time.monotonic() + 10
    while session in app.state_holder.session_data and time.monotonic() < deadline:
        time.sleep(0.1)
    client.close()
    assert session not in app.state_holder.session_data
    assert session not in app._queue.pending_event_ids_session


def test_an_idle_session_is_forgotten_and_a_recent_one_kept(app):
    client = Client(app.local_url, verbose=False)
    client.predict("hello", max_new_tokens=4, api_name="/chat")
    idle = client.session_hash
    client.reset_session()  # the old session is left without a word: no heartbeat tells its end
    client.predict("hello", max_new_tokens=4, api_name="/chat")
    app.state_holder.time_last_used[idle] -= datetime.timedelta(hours=1)
    forget_idle_sessions(app)
    assert idle not in app.state_holder.session_data
    assert client.session_hash in app.state_holder.session_data
    client.close()
