"""The conversation tabs' shared machinery (Chat, Image, Video): a chatbot with its input box,
settings and events, and the streaming of one turn for the page and for the APIs.

Built from plain Blocks events rather than gr.ChatInterface, so that a refused message or a failed
generation leaves the page as it was (toast, conversation unchanged, input usable) and Stop keeps
the reply's statistics. Each event chain is: prepare (instant, never waiting for a slot: check the
message, show it) -> respond (queued, streams) -> unlock the input, which runs whatever happened
before.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr

from .engine import Sampling, UserError, sampling_defaults, stream_reply
from .manager import ModelManager
from .registry import CHAT, VISION, models_for
from .remote import shows_reasoning, stream_remote
from .turns import (RunningTurns, SessionLimit, Turn, check_conversation, check_message,
                    check_stop_sequences, conversation, drop_oldest, message_files, message_text, refuse, status)
from .zerogpu import gpu

SLOT_WAIT_SECONDS = 0.5

BUSY = {"interactive": False, "submit_btn": False, "stop_btn": True}
IDLE = {"interactive": True, "submit_btn": True, "stop_btn": False}


@dataclass(frozen=True)
class Limits:
    """What one turn may use (README: Limits)."""

    max_context: int = 32768  # tokens, prompt plus reply; longer conversations lose their oldest turns
    request_timeout: float = 600.0  # seconds, waiting for a decode slot included
    per_user: int = 2  # requests of one client session at a time
    max_upload_bytes: int | None = None  # a file's size: launch(max_file_size) enforces it, /image and /video check again


class ChatSession:
    """Answers chat turns for the tab and the API: settings checks, loading notes, slots, limits."""

    def __init__(self, manager: ModelManager, limits: Limits, task: str = CHAT) -> None:
        self.manager = manager
        self.task = task
        self.limits = limits
        self.running = RunningTurns()
        self.users = SessionLimit(limits.per_user)

    def stream(self, turn: Turn, content, model_name: str, system_prompt: str, settings: tuple, user: str | None = None,
               progress: Callable[[float, str], None] | None = None, media_options: dict | None = None) -> Iterator[list[dict]]:
        """Yield the chat as the reply to `content` (the new user entry's) grows; raises the
        REFUSALS with user messages. `user`: the client session, for the per-user limit."""
        if model_name not in self.manager.registry or self.manager.registry[model_name].task != self.task:
            raise UserError(f"Unknown model {model_name!r}. Choose one of: {', '.join(models_for(self.manager.registry, self.task))}.")
        sampling = make_sampling(*settings)
        history = turn.history[:-1]  # what came before the new user message
        system_prompt = system_prompt or ""
        check_conversation(history, system_prompt)
        if media_options and "max_frames" in media_options:  # within the sliders' bounds, which Gradio checks
            media_options = {**media_options, "max_frames": int(media_options["max_frames"])}
        messages = conversation(history, system_prompt, content, with_media=self.task == VISION)
        spec = self.manager.registry[model_name]
        with self.users.hold(user):
            if spec.remote:  # an engine elsewhere answers: nothing to load, no local slot to wait for
                for reply in stream_remote(spec, messages, sampling, turn.cancel, media_options):
                    turn.reply, turn.thinking = reply, turn.thinking or shows_reasoning(reply)
                    yield turn.messages()
                return
            deadline = time.monotonic() + self.limits.request_timeout
            if all(m.spec.name != model_name for m in self.manager.loaded()):
                yield turn.messages(status(f"⏳ Loading {model_name} (first use)…"))
            with self.manager.use(model_name, progress) as loaded:
                while not loaded.slots.acquire(timeout=SLOT_WAIT_SECONDS):
                    if turn.cancel.is_set():
                        return
                    if time.monotonic() > deadline:
                        raise UserError(f"{model_name} is busy: no slot came free within {self.limits.request_timeout:.0f} s. "
                                        "Please try again shortly.")
                    yield turn.messages(status(f"⏳ Waiting for a free slot on {model_name}…"))
                try:
                    for reply in stream_reply(loaded, messages, sampling, cancel=turn.cancel, max_context=self.limits.max_context,
                                              media_options=media_options, deadline=deadline):
                        turn.reply = reply
                        yield turn.messages()
                finally:
                    loaded.slots.release()


@dataclass
class Controls:
    """What a tab's API endpoint shares with its page: the session and the settings widgets."""

    session: ChatSession
    model: gr.Dropdown
    system_prompt: gr.Textbox
    settings: list
    sampling_of_frames: list


def make_sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_sequences) -> Sampling:
    """Sampling from the settings widgets (or API values); -1 or empty seed means random."""
    return Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=None if seed in (None, "", -1) else seed,
        stop_strings=check_stop_sequences(stop_sequences),
    )


def last_user_index(history: list[dict]) -> int | None:
    return next((i for i in range(len(history) - 1, -1, -1) if history[i].get("role") == "user"), None)


def build_conversation(manager: ModelManager, default_model: str, limits: Limits, concurrency_limit: int,
                       media: str | None, examples: list[dict], placeholder: str, intro: str) -> Controls:
    """Render a conversation tab inside the current Blocks context: text chat (`media` None) or
    chat about images / a video ("image", "video": a multimodal input, the VL models)."""
    task = VISION if media else CHAT
    session = ChatSession(manager, limits, task)
    specs = manager.registry
    video = media == "video"
    model = gr.Dropdown([(specs[name].label, name) for name in models_for(specs, task)], value=default_model, label="Model")
    chatbot = gr.Chatbot(
        height=560, editable="user", buttons=["copy", "copy_all"], layout="bubble", show_label=False,
        placeholder=intro, examples=examples,
    )
    box_options = dict(show_label=False, placeholder=placeholder, submit_btn=True, stop_btn=False, autofocus=not media,
                       lines=1, max_lines=8)
    if media:
        textbox = gr.MultimodalTextbox(file_types=[media], file_count="single" if video else "multiple", **box_options)
    else:
        textbox = gr.Textbox(**box_options)
    frames = gr.Gallery(label="Frames the model saw", columns=8, height=220, visible=video, interactive=False)
    defaults = sampling_defaults(manager.generation_defaults(default_model))
    with gr.Accordion("Sampling settings", open=False):
        system_prompt = gr.Textbox("", label="System prompt", lines=2, placeholder="You are a helpful assistant.")
        max_new_tokens = gr.Slider(1, 4096, value=512, step=1, label="Max new tokens")
        sliders = [
            gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p"),
            gr.Slider(0, 200, value=defaults["top_k"], step=1, label="Top-k (0 = off)"),
            gr.Slider(1.0, 2.0, value=defaults["repetition_penalty"], step=0.05, label="Repetition penalty"),
        ]
        seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
        stop_sequences = gr.Textbox("", label="Stop sequences (one per line)", lines=2)
        if video:
            sampling_of_frames = [gr.Slider(0.25, 4.0, value=2.0, step=0.25, label="Frames per second sampled"),
                                  gr.Slider(2, 180, value=180, step=2, label="Max frames")]
        else:
            sampling_of_frames = [gr.State(None), gr.State(None)]
        # The VL-PT model answers directly unless asked to think first (its template's enable_thinking).
        thinking = gr.Checkbox(False, label="Think before answering (reasoning shown collapsed)") if media else gr.State(False)
    settings = [max_new_tokens, *sliders, seed, stop_sequences]
    model.change(lambda name: list(sampling_defaults(manager.generation_defaults(name)).values()), model, sliders,
                 api_visibility="private")
    pending = gr.State(None)  # the user entry's content a prepare step accepted, then (epoch, content)

    def entry(text: str, files: list[str]):
        """A user entry's content: the text, after the images when there are any."""
        return [*({"path": path} for path in files), text] if files else text

    def box(content):
        """The input box holding `content` again (to edit and resend)."""
        return {"text": message_text(content), "files": message_files(content)} if media else message_text(content)

    def accept(message, history):
        try:
            text = check_message(message)
        except UserError as error:
            gr.Warning(refuse(error, "message"))
            keep = gr.skip() if message_text(message).strip() else gr.update(value=None)  # kept to edit, unless blank
            return keep, gr.skip(), None
        content = entry(text, message_files(message))
        return gr.update(value=None, **BUSY), [*history, {"role": "user", "content": content}], content

    def retry(history):
        index = last_user_index(history)
        if index is None:
            return gr.skip(), gr.skip(), None
        return gr.update(**BUSY), history[: index + 1], history[index]["content"]

    def edit(history, edit_data: gr.EditData):
        before, files = history[: edit_data.index], message_files(history[edit_data.index]["content"])
        try:
            text = check_message(edit_data.value)
        except UserError as error:
            gr.Warning(refuse(error, "edit"))
            return gr.skip(), [*before, {"role": "user", "content": entry(message_text(edit_data.previous_value), files)}], None
        content = entry(text, files)
        return gr.update(**BUSY), [*before, {"role": "user", "content": content}], content

    def example(history, selected: gr.SelectData):
        return accept(selected.value, history)

    @gpu
    def respond(content, history, model_name, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                seed, stop_sequences, fps, max_frames, think, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        if content is None or content[0] != session.running.epoch(request.session_hash):
            yield gr.skip(), gr.skip(), gr.skip()  # refused, or cleared while it waited: leave all as it is
            return
        content = content[1]
        model_thinks = model_name in specs and specs[model_name].thinking
        turn = Turn(history, thinking=model_thinks or bool(think))
        values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_sequences)
        options = {"enable_thinking": model_thinks or bool(think)} if media else None
        if video:
            options.update(fps=fps, max_frames=max_frames)
        shown = None
        try:
            with session.running.track(request.session_hash, turn):
                for messages in session.stream(turn, content, model_name, system, values, request.session_hash,
                                               lambda fraction, note: progress(fraction, desc=note), options):
                    gallery = gr.skip()
                    if video and turn.reply.videos and shown is not turn.reply.videos:
                        shown, last = turn.reply.videos, turn.reply.videos[-1]
                        gallery = [(frame, f"{seconds:.1f} s") for frame, seconds in zip(last.frames, last.timestamps)]
                    yield gr.skip() if turn.discarded else messages, gr.skip(), gallery
        except Exception as error:  # the conversation and the message go back as they were
            gr.Warning(refuse(error, media or task))
            yield history[:-1], gr.update(value=box(content)), gr.skip()

    def stamp(content, request: gr.Request):
        return None if content is None else (session.running.epoch(request.session_hash), content)

    def stop(request: gr.Request):
        turn = session.running.stop(request.session_hash)
        return gr.skip() if turn is None else turn.stopped()

    def undo(history, request: gr.Request):
        session.running.stop(request.session_hash, discard=True)  # undoing a reply still streaming
        index = last_user_index(history)
        if index is None:
            return gr.skip(), gr.skip()
        return history[:index], gr.update(value=box(history[index]["content"]))

    for trigger, prepare, inputs in [
        (textbox.submit, accept, [textbox, chatbot]),
        (chatbot.retry, retry, [chatbot]),
        (chatbot.edit, edit, [chatbot]),
        (chatbot.example_select, example, [chatbot]),
    ]:
        # Queued (toasts need the queue) but never waiting for a slot: refusals show at once.
        prepared = trigger(prepare, inputs, [textbox, chatbot, pending], concurrency_limit=None,
                           show_progress="hidden", api_visibility="private")
        prepared.then(stamp, pending, pending, queue=False, api_visibility="private").then(
            respond, [pending, chatbot, model, system_prompt, *settings, *sampling_of_frames, thinking], [chatbot, textbox, frames],
            concurrency_limit=concurrency_limit, concurrency_id=task, show_progress="minimal", show_progress_on=chatbot,
            api_visibility="private",
        ).then(lambda: gr.update(**IDLE), None, textbox, queue=False, api_visibility="private")
    # Stop and Clear cancel the turn, not the event: the generator ends within one decode step with
    # a last update of its own (the statistics, or nothing after Clear), so no late update can
    # overwrite them, and the input unlocks when it is really done.
    textbox.stop(stop, None, chatbot, queue=False, api_visibility="private")
    chatbot.undo(undo, chatbot, [chatbot, textbox], queue=False, api_visibility="private")

    def clear(request: gr.Request) -> None:
        session.running.stop(request.session_hash, discard=True)

    chatbot.clear(clear, None, None, queue=False, api_visibility="private")
    return Controls(session, model, system_prompt, settings, sampling_of_frames)


def api_stream(session: ChatSession, history: list[dict], content, model_name: str, system_prompt: str,
               values: tuple, where: str, user: str | None, media_options: dict | None = None) -> Iterator[tuple]:
    """Stream one API turn as (the reply's messages, the session's conversation at the end: what
    the context trimming left out is dropped from it, so a session's state stays bounded);
    failures become gr.Error with the user's message."""
    try:
        check_message(content)
        spec = session.manager.registry.get(model_name)
        turn = Turn([*history, {"role": "user", "content": content}], thinking=bool(spec and spec.thinking))
        messages = turn.messages()
        for messages in session.stream(turn, content, model_name, system_prompt, values, user, media_options=media_options):
            yield messages[len(history) + 1:], gr.skip()
    except Exception as error:
        raise gr.Error(refuse(error, where), print_exception=False) from None
    yield messages[len(history) + 1:], drop_oldest(messages, turn.reply.left_out, with_media=session.task == VISION)
