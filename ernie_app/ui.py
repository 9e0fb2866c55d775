"""Assemble the app: a header, then one tab per task (each tab lives in its own module)."""
from __future__ import annotations

import asyncio
import datetime

import gradio as gr

from .chat_tab import build_chat_tab
from .classify_tab import build_classify_tab
from .conversation import Limits
from .image_tab import build_image_tab
from .manager import ModelManager
from .registry import CLASSIFY, VISION, models_for
from .video_tab import build_video_tab

TITLE = "ERNIE 4.5 Studio"
INTRO = "Run and try Baidu's ERNIE models in your browser, on our own PyTorch implementations."
# A session without a request for this long is forgotten: its tab or client left without a word
# (a gradio_client's reset_session, a client that never held the heartbeat).
SESSION_IDLE_SECONDS = 15 * 60  # longer than a turn may take (the request timeout, 10 min by default)


def build_app(
    manager: ModelManager,
    default_model: str,
    notice: str = "",
    limits: Limits = Limits(),
    concurrency_limit: int = 8,
) -> gr.Blocks:
    with gr.Blocks(title=TITLE, fill_height=True) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        if notice:
            gr.Markdown(f"> ⚠️ {notice}")
        with gr.Tab("Chat"):
            build_chat_tab(manager, default_model, limits, concurrency_limit)
        vision = models_for(manager.registry, VISION)
        if vision:
            with gr.Tab("Image"):
                build_image_tab(manager, vision[0], limits, concurrency_limit)
            with gr.Tab("Video"):
                build_video_tab(manager, vision[0], limits, concurrency_limit)
        if models_for(manager.registry, CLASSIFY):
            with gr.Tab("Multilingual classification"):
                build_classify_tab(manager, concurrency_limit)
        bound_sessions(app)
    return app


def bound_sessions(app: gr.Blocks) -> None:
    """Free each session's server state when it ends, and after SESSION_IDLE_SECONDS without a
    request: Gradio 6.31 keeps every session's copy of all the components' configs (~0.3 MB here)
    until 10,000 newer sessions have come, and its gr.State values for an hour after it ended.
    Both run on the server's event loop, as Gradio's own state sweeps do."""
    async def ended(request: gr.Request) -> None:
        forget_session(app, request.session_hash)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(60)
            forget_idle_sessions(app)

    async def start_sweeping() -> None:
        app.idle_session_sweep = asyncio.create_task(sweep())  # held: the loop keeps only a weak reference

    app.unload(ended)
    app.extra_startup_events.append(start_sweeping)


def forget_idle_sessions(app: gr.Blocks, idle_seconds: float = SESSION_IDLE_SECONDS) -> None:
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=idle_seconds)
    for session_hash, last_used in list(app.state_holder.time_last_used.items()):
        if last_used < cutoff:
            forget_session(app, session_hash)


def forget_session(app: gr.Blocks, session_hash: str) -> None:
    """Drop a session's state and its entries in the queue's per-session tables (Gradio leaves
    an empty one behind per session), unless one of its events is still pending."""
    holder, queue = app.state_holder, app._queue
    if queue.pending_event_ids_session.get(session_hash):
        return
    queue.pending_event_ids_session.pop(session_hash, None)
    queue.pending_messages_per_session.pop(session_hash, None)
    with holder.lock:
        holder.session_data.pop(session_hash, None)
        holder.time_last_used.pop(session_hash, None)
