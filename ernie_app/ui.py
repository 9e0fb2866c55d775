"""Assemble the app: a header, then one tab per task (each tab lives in its own module)."""
from __future__ import annotations

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
    return app
