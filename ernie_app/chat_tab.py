"""The Chat tab: multi-turn streaming chat with the ERNIE 4.5 text models."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import gradio as gr
from gradio import ChatMessage

from models import CheckpointError

from .engine import STOP_REASONS, Reply, Sampling, UserError, sampling_defaults, stream_reply
from .manager import ModelManager, ModelUnavailable
from .reasoning import split_reasoning

log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 200_000  # beyond this, even tokenizing is wasted work: no model context fits it
SLOT_WAIT_SECONDS = 0.5
EXAMPLES = [
    "Write a haiku about the sea at night.",
    "用三句话介绍一下文心一言。",
    "Explain the difference between a list and a tuple in Python.",
    "What should I see in Beijing in one day?",
]


def message_text(content) -> str:
    """Text of a chat history entry: a string, or Gradio's list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def conversation(history: list[dict], system_prompt: str, message: str) -> list[dict]:
    """Model messages from the chat history. Reasoning, statistics and status entries (Gradio
    metadata messages) are display-only and never sent back to the model."""
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    for entry in history:
        if (entry.get("metadata") or {}).get("title"):
            continue
        text = message_text(entry.get("content"))
        if entry.get("role") in ("user", "assistant") and text:
            messages.append({"role": entry["role"], "content": text})
    messages.append({"role": "user", "content": message})
    return messages


def stats_line(reply: Reply) -> str:
    parts = []
    if reply.tokens_per_second is not None:
        parts.append(f"{reply.tokens_per_second:.1f} tok/s")
    if reply.time_to_first_token is not None:
        parts.append(f"first token {reply.time_to_first_token:.2f} s")
    parts.append(f"{reply.new_tokens} tokens")
    if reply.stop_reason:
        parts.append(STOP_REASONS[reply.stop_reason])
    return " · ".join(parts)


def render(reply: Reply, thinking: bool) -> list[ChatMessage]:
    """The reply as chat messages: collapsed reasoning (thinking models), the answer, and a
    statistics line under it once finished."""
    messages = []
    answer = reply.text
    if thinking:
        split = split_reasoning(reply.text)
        status = "done" if split.thinking_done or reply.stop_reason else "pending"
        messages.append(ChatMessage(content=split.reasoning or "…", metadata={"title": "💭 Reasoning", "status": status}))
        answer = split.answer
    if answer or not thinking:
        messages.append(ChatMessage(content=answer or ("…" if reply.stop_reason is None else "(no text)")))
    if reply.stop_reason:
        messages.append(ChatMessage(content="", metadata={"title": f"⚡ {stats_line(reply)}", "status": "done"}))
    return messages


def chat_fn(manager: ModelManager, max_context: int) -> Callable[..., Iterator[list[ChatMessage]]]:
    """The ChatInterface handler, bound to a manager. Every failure becomes a gr.Error message."""

    def chat(
        message: str,
        history: list[dict],
        model_name: str,
        system_prompt: str = "",
        max_new_tokens: int = 512,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop_sequences: str = "",
        progress: gr.Progress = gr.Progress(track_tqdm=True),
    ) -> Iterator[list[ChatMessage]]:
        text = message_text(message)
        if not text.strip():
            raise gr.Error("Please type a message.")
        if len(text) > MAX_MESSAGE_CHARS:
            raise gr.Error(f"That message has {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}.")
        if model_name not in manager.registry:
            raise gr.Error(f"Unknown model {model_name!r}. Choose one of: {', '.join(manager.registry)}.")
        spec = manager.registry[model_name]
        sampling = Sampling(
            max_new_tokens=int(max_new_tokens),
            temperature=temperature, top_p=top_p, top_k=None if top_k is None else int(top_k),
            repetition_penalty=repetition_penalty, seed=None if seed in (None, "", -1) else int(seed),
            stop_strings=tuple(s for s in stop_sequences.splitlines() if s),
        )
        try:
            if all(m.spec.name != model_name for m in manager.loaded()):
                yield [ChatMessage(content="", metadata={"title": f"⏳ Loading {model_name} (first use)…", "status": "pending"})]
            with manager.use(model_name, lambda fraction, note: progress(fraction, desc=note)) as loaded:
                while not loaded.slots.acquire(timeout=SLOT_WAIT_SECONDS):
                    yield [ChatMessage(content="", metadata={"title": f"⏳ Waiting for a free slot on {model_name}…", "status": "pending"})]
                try:
                    for reply in stream_reply(loaded, conversation(history, system_prompt, text), sampling, max_context=max_context):
                        yield render(reply, spec.thinking)
                finally:
                    loaded.slots.release()
        except (UserError, ModelUnavailable, CheckpointError) as error:
            raise gr.Error(str(error)) from None
        except gr.Error:
            raise
        except Exception as error:  # never a traceback in the UI; the log keeps it
            log.exception("chat request failed")
            raise gr.Error(f"Generation failed: {type(error).__name__}: {error}") from None

    return chat


def build_chat_tab(manager: ModelManager, default_model: str, max_context: int, concurrency_limit: int) -> gr.ChatInterface:
    """Render the Chat tab inside the current Blocks context."""
    # Rendered here, above the chat, so the model switcher stays visible (not in the accordion).
    model = gr.Dropdown(list(manager.registry), value=default_model, label="Model")
    defaults = sampling_defaults(manager.generation_defaults(default_model))
    sampling = [
        gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p", render=False),
        gr.Slider(0, 200, value=defaults["top_k"], step=1, label="Top-k (0 = off)", render=False),
        gr.Slider(1.0, 2.0, value=defaults["repetition_penalty"], step=0.05, label="Repetition penalty", render=False),
    ]
    model.change(lambda name: list(sampling_defaults(manager.generation_defaults(name)).values()), model, sampling,
                 api_visibility="private")
    additional_inputs = [
        model,
        gr.Textbox("", label="System prompt", lines=2, placeholder="You are a helpful assistant.", render=False),
        gr.Slider(1, 4096, value=512, step=1, label="Max new tokens", render=False),
        *sampling,
        gr.Number(-1, label="Seed (-1 = random)", precision=0, render=False),
        gr.Textbox("", label="Stop sequences (one per line)", lines=2, render=False),
    ]
    return gr.ChatInterface(
        chat_fn(manager, max_context),
        chatbot=gr.Chatbot(
            height=560, editable="user", buttons=["copy", "copy_all"], layout="bubble",
            placeholder="Ask ERNIE anything. The model loads on first use.",
        ),
        additional_inputs=additional_inputs,
        additional_inputs_accordion=gr.Accordion("Sampling settings", open=False, render=False),
        examples=[[example] for example in EXAMPLES],
        cache_examples=False,
        editable=True,
        api_name="chat",
        api_description="Chat with an ERNIE 4.5 text model; streams the reply as chat messages.",
        concurrency_limit=concurrency_limit,
        fill_height=True,
    )
