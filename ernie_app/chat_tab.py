"""The Chat tab: multi-turn streaming chat with the ERNIE 4.5 text models, and the `/chat` API."""
from __future__ import annotations

import gradio as gr

from .conversation import Controls, Limits, api_stream, build_conversation
from .manager import ModelManager
from .registry import CHAT
from .zerogpu import gpu

EXAMPLES = [{"text": text} for text in (
    "Write a haiku about the sea at night.",
    "用三句话介绍一下文心一言。",
    "Explain the difference between a list and a tuple in Python.",
    "What should I see in Beijing in one day?",
)]


def build_chat_tab(manager: ModelManager, default_model: str, limits: Limits, concurrency_limit: int) -> None:
    """Render the Chat tab inside the current Blocks context, with its /chat API."""
    controls = build_conversation(manager, default_model, limits, concurrency_limit, None, EXAMPLES,
                                  "Message ERNIE…", "Ask ERNIE anything. The model loads on first use.")
    build_chat_api(controls, concurrency_limit)


def build_chat_api(controls: Controls, concurrency_limit: int) -> None:
    """/chat: message first, every setting optional; each client session keeps its conversation."""
    @gpu
    def chat(message: str, history: list[dict], model_name: str, system_prompt: str = "", max_new_tokens: int = 512,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, seed: int | None = None, stop_sequences: str = "",
             request: gr.Request = None):
        """Chat with an ERNIE 4.5 text model; streams the reply as chat messages."""
        values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_sequences)
        yield from api_stream(controls.session, history, message, model_name, system_prompt, values, "/chat",
                              request and request.session_hash)

    api_history = gr.State([])
    gr.Button(visible=False).click(
        chat, [gr.Textbox(visible=False), api_history, controls.model, controls.system_prompt, *controls.settings], [gr.JSON(visible=False), api_history],
        api_name="chat", concurrency_limit=concurrency_limit, concurrency_id=CHAT, postprocess=False,
    )
