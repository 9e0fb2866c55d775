"""The Chat tab: multi-turn streaming chat with the ERNIE 4.5 text models, and the `/chat` API.

Built from plain Blocks events rather than gr.ChatInterface, so that a refused message or a failed
generation leaves the page as it was (toast, conversation unchanged, input usable) and Stop keeps
the reply's statistics. Each event chain is: prepare (instant, unqueued: check the message, show
it) -> respond (queued, streams) -> unlock the input, which runs whatever happened before.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import gradio as gr

from .engine import Sampling, UserError, sampling_defaults, stream_reply
from .manager import ModelManager
from .registry import CHAT, models_for
from .turns import RunningTurns, Turn, check_message, conversation, message_text, refuse, status

SLOT_WAIT_SECONDS = 0.5
EXAMPLES = [
    "Write a haiku about the sea at night.",
    "用三句话介绍一下文心一言。",
    "Explain the difference between a list and a tuple in Python.",
    "What should I see in Beijing in one day?",
]
BUSY = {"interactive": False, "submit_btn": False, "stop_btn": True}
IDLE = {"interactive": True, "submit_btn": True, "stop_btn": False}


class ChatSession:
    """Answers chat turns for the tab and the API: settings checks, loading notes, slots."""

    def __init__(self, manager: ModelManager, max_context: int) -> None:
        self.manager = manager
        self.max_context = max_context
        self.running = RunningTurns()

    def stream(self, turn: Turn, text: str, model_name: str, system_prompt: str, settings: tuple,
               progress: Callable[[float, str], None] | None = None) -> Iterator[list[dict]]:
        """Yield the chat as the reply to `text` grows; raises the REFUSALS with user messages."""
        if model_name not in self.manager.registry:
            raise UserError(f"Unknown model {model_name!r}. Choose one of: {', '.join(self.manager.registry)}.")
        sampling = make_sampling(*settings)
        history = turn.history[:-1]  # what came before the new user message
        if all(m.spec.name != model_name for m in self.manager.loaded()):
            yield turn.messages(status(f"⏳ Loading {model_name} (first use)…"))
        with self.manager.use(model_name, progress) as loaded:
            while not loaded.slots.acquire(timeout=SLOT_WAIT_SECONDS):
                if turn.cancel.is_set():
                    return
                yield turn.messages(status(f"⏳ Waiting for a free slot on {model_name}…"))
            try:
                messages = conversation(history, system_prompt or "", text)
                for reply in stream_reply(loaded, messages, sampling, cancel=turn.cancel, max_context=self.max_context):
                    turn.reply = reply
                    yield turn.messages()
            finally:
                loaded.slots.release()


def make_sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_sequences) -> Sampling:
    """Sampling from the settings widgets (or API values); -1 or empty seed means random."""
    return Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=None if seed in (None, "", -1) else seed,
        stop_strings=tuple(s for s in (stop_sequences or "").splitlines() if s),
    )


def last_user_index(history: list[dict]) -> int | None:
    return next((i for i in range(len(history) - 1, -1, -1) if history[i].get("role") == "user"), None)


def build_chat_tab(manager: ModelManager, default_model: str, max_context: int, concurrency_limit: int) -> None:
    """Render the Chat tab inside the current Blocks context."""
    session = ChatSession(manager, max_context)
    specs = manager.registry
    model = gr.Dropdown([(specs[name].label, name) for name in models_for(specs, CHAT)], value=default_model, label="Model")
    chatbot = gr.Chatbot(
        height=560, editable="user", buttons=["copy", "copy_all"], layout="bubble", show_label=False,
        placeholder="Ask ERNIE anything. The model loads on first use.",
        examples=[{"text": example} for example in EXAMPLES],
    )
    textbox = gr.Textbox(show_label=False, placeholder="Message ERNIE…", submit_btn=True, stop_btn=False,
                         autofocus=True, lines=1, max_lines=8)
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
    settings = [max_new_tokens, *sliders, seed, stop_sequences]
    model.change(lambda name: list(sampling_defaults(manager.generation_defaults(name)).values()), model, sliders,
                 api_visibility="private")
    pending = gr.State(None)  # the message a prepare step accepted, for respond

    def accept(message, history):
        try:
            text = check_message(message)
        except UserError as error:
            gr.Warning(refuse(error, "message"))
            box = gr.skip() if message_text(message).strip() else gr.update(value="")  # kept to edit, unless blank
            return box, gr.skip(), None
        return gr.update(value="", **BUSY), [*history, {"role": "user", "content": text}], text

    def retry(history):
        index = last_user_index(history)
        if index is None:
            return gr.skip(), gr.skip(), None
        return gr.update(**BUSY), history[: index + 1], message_text(history[index]["content"])

    def edit(history, edit_data: gr.EditData):
        before = history[: edit_data.index]
        try:
            text = check_message(edit_data.value)
        except UserError as error:
            gr.Warning(refuse(error, "edit"))
            return gr.skip(), [*before, {"role": "user", "content": edit_data.previous_value}], None
        return gr.update(**BUSY), [*before, {"role": "user", "content": text}], text

    def example(history, selected: gr.SelectData):
        return accept(selected.value["text"], history)

    def respond(text, history, model_name, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                seed, stop_sequences, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        if text is None:  # the prepare step refused: leave everything as it is
            yield gr.skip(), gr.skip()
            return
        turn = Turn(history, thinking=model_name in specs and specs[model_name].thinking)
        values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_sequences)
        try:
            with session.running.track(request.session_hash, turn):
                for messages in session.stream(turn, text, model_name, system, values,
                                               lambda fraction, note: progress(fraction, desc=note)):
                    yield gr.skip() if turn.discarded else messages, gr.skip()
        except Exception as error:  # the conversation and the message go back as they were
            gr.Warning(refuse(error, "chat"))
            yield history[:-1], gr.update(value=text)

    def stop(request: gr.Request):
        turn = session.running.stop(request.session_hash)
        return gr.skip() if turn is None else turn.stopped()

    def undo(history, request: gr.Request):
        session.running.stop(request.session_hash, discard=True)  # undoing a reply still streaming
        index = last_user_index(history)
        if index is None:
            return gr.skip(), gr.skip()
        return history[:index], gr.update(value=message_text(history[index]["content"]))

    for trigger, prepare, inputs in [
        (textbox.submit, accept, [textbox, chatbot]),
        (chatbot.retry, retry, [chatbot]),
        (chatbot.edit, edit, [chatbot]),
        (chatbot.example_select, example, [chatbot]),
    ]:
        # Queued (toasts need the queue) but never waiting for a slot: refusals show at once.
        prepared = trigger(prepare, inputs, [textbox, chatbot, pending], concurrency_limit=None,
                           show_progress="hidden", api_visibility="private")
        prepared.then(
            respond, [pending, chatbot, model, system_prompt, *settings], [chatbot, textbox],
            concurrency_limit=concurrency_limit, concurrency_id="chat", show_progress="minimal", show_progress_on=chatbot,
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

    # The /chat API: message first, every setting optional; each client session keeps its conversation.
    api_message = gr.Textbox(visible=False)
    api_history = gr.State([])
    api_response = gr.JSON(visible=False)

    def chat(message: str, history: list[dict], model_name: str, system_prompt: str = "", max_new_tokens: int = 512,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, seed: int | None = None, stop_sequences: str = ""):
        """Chat with an ERNIE 4.5 text model; streams the reply as chat messages."""
        try:
            text = check_message(message)
            turn = Turn([*history, {"role": "user", "content": text}],
                        thinking=model_name in specs and specs[model_name].thinking)
            values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_sequences)
            messages = turn.messages()
            for messages in session.stream(turn, text, model_name, system_prompt, values):
                yield messages[len(history) + 1:], gr.skip()
        except Exception as error:
            raise gr.Error(refuse(error, "/chat"), print_exception=False) from None
        yield messages[len(history) + 1:], messages

    gr.Button(visible=False).click(
        chat, [api_message, api_history, model, system_prompt, *settings], [api_response, api_history],
        api_name="chat", concurrency_limit=concurrency_limit, concurrency_id="chat", postprocess=False,
    )
