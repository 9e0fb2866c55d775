"""One answered turn as every tab shows it: the message checks, the model messages built from the
visible history, the reply rendered as chat messages (collapsed reasoning, answer, statistics), and
the turn each browser session is answering, so that Stop ends it and still shows its statistics."""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path

from models import CheckpointError

from .engine import STOP_REASONS, Reply, UserError
from .manager import ModelUnavailable
from .reasoning import split_reasoning

log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 200_000  # beyond this, even tokenizing is wasted work: no model context fits it
# Caps checked before templating, so that a hostile client's history cannot cost more than a context.
MAX_SYSTEM_PROMPT_CHARS = 20_000
MAX_HISTORY_MESSAGES = 1_000
MAX_HISTORY_CHARS = 2_000_000
MAX_FILES_PER_MESSAGE = 8
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 200
# Failures whose message is written for the user; anything else is a server fault.
REFUSALS = (UserError, ModelUnavailable, CheckpointError)
SERVER_FAULT = "Generation failed on the server; the server log has the details. Please try again."
NO_ANSWER = {
    "max_new_tokens": "No answer yet: the reasoning used all the new tokens. Raise Max new tokens and retry.",
    "context": "No answer: the reasoning filled the context. Clear the chat or shorten it.",
    "cancelled": "Stopped while reasoning, before an answer.",
    "eos": "The model ended its turn without an answer.",
    "stop_string": "A stop sequence ended the reply before an answer.",
}


def refuse(error: Exception, where: str) -> str:
    """The user-facing message for a failure, logged in one line (a traceback only for faults)."""
    if isinstance(error, REFUSALS):
        log.info("%s refused: %s", where, error)
        return str(error)
    log.error("%s failed", where, exc_info=error)
    return SERVER_FAULT


def message_text(content) -> str:
    """Text of a chat history entry: a string, or Gradio's list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def message_files(content) -> list[str]:
    """Paths of the files in a chat history entry (Gradio's file parts) or a multimodal input."""
    if isinstance(content, dict):
        if content.get("type") == "file":
            return [content["file"]["path"]]
        if content.get("path"):
            return [content["path"]]
        # a multimodal input box's value: {"text", "files": [path or {"path"}]}
        return [f if isinstance(f, str) else f["path"] for f in content.get("files") or []]
    if isinstance(content, (list, tuple)):
        return [path for part in content for path in message_files(part)]
    return []


VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpeg", ".mpg", ".ogv", ".3gp"}


def media_part(path: str) -> dict:
    kind = "video" if Path(path).suffix.lower() in VIDEO_SUFFIXES else "image"
    return {"type": kind, kind: path}


def model_content(content, with_media: bool):
    """What the model is sent for a history entry: its text, or for VL models its images and
    videos (as parts, in order) followed by its text."""
    text = message_text(content)
    files = message_files(content) if with_media else []
    if not files:
        return text
    return [*(media_part(path) for path in files), *([{"type": "text", "text": text}] if text else [])]


def check_message(message) -> str:
    """The text of a new message, or a UserError saying why it is refused."""
    text = message_text(message)
    if not text.strip():
        raise UserError("Please type a message.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise UserError(f"That message has {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}.")
    files = len(message_files(message))
    if files > MAX_FILES_PER_MESSAGE:
        raise UserError(f"That message has {files} files; the limit is {MAX_FILES_PER_MESSAGE} per message.")
    return text


def check_conversation(history: list, system_prompt: str) -> None:
    """Refuse a history or system prompt over the caps (a UserError saying what to do)."""
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise UserError("The chat history must be a list of {'role': ..., 'content': ...} messages.")
    if len(system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise UserError(f"The system prompt has {len(system_prompt):,} characters; the limit is {MAX_SYSTEM_PROMPT_CHARS:,}.")
    chars = sum(len(message_text(entry.get("content"))) for entry in history)
    if len(history) > MAX_HISTORY_MESSAGES or chars > MAX_HISTORY_CHARS:
        raise UserError(f"This chat is too long to go on ({len(history):,} messages, {chars:,} characters; the limits are "
                        f"{MAX_HISTORY_MESSAGES:,} and {MAX_HISTORY_CHARS:,}). Clear it to start again.")


def check_stop_sequences(text: str) -> tuple[str, ...]:
    """The stop sequences, one per line, or a UserError."""
    stops = tuple(s for s in (text or "").splitlines() if s)
    if len(stops) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_SEQUENCE_CHARS for s in stops):
        raise UserError(f"Use at most {MAX_STOP_SEQUENCES} stop sequences of at most {MAX_STOP_SEQUENCE_CHARS} characters each.")
    return stops


def is_display_only(entry: dict) -> bool:
    """Reasoning, statistics and status entries (Gradio metadata messages) are never sent back."""
    return bool((entry.get("metadata") or {}).get("title"))


def model_message(entry: dict, with_media: bool) -> dict | None:
    """The model message a history entry becomes, or None (display-only entries, empty ones)."""
    content = model_content(entry.get("content"), with_media)
    if entry.get("role") in ("user", "assistant") and content and not is_display_only(entry):
        return {"role": entry["role"], "content": content}
    return None


def conversation(history: list[dict], system_prompt: str, message, with_media: bool = False) -> list[dict]:
    """Model messages from the visible chat history plus the new user message (text, or a
    history entry's content); images go along only `with_media`."""
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    entries = (model_message(entry, with_media) for entry in [*history, {"role": "user", "content": message}])
    return messages + [m for m in entries if m is not None]


def drop_oldest(history: list[dict], count: int, with_media: bool = False) -> list[dict]:
    """The history without its first `count` model messages (and the display-only entries that
    went with them): what a session keeps once the context trimming left those out."""
    if count == 0:
        return history
    for index, entry in enumerate(history):
        if model_message(entry, with_media) is not None:
            if count == 0:
                return history[index:]
            count -= 1
    return []


def status(title: str) -> dict:
    """A pending status line in the chat (loading, waiting for a slot)."""
    return {"role": "assistant", "content": "", "metadata": {"title": title, "status": "pending"}}


def stats_line(reply: Reply) -> str:
    parts = []
    if reply.tokens_per_second is not None:
        parts.append(f"{reply.tokens_per_second:.1f} tok/s")
    if reply.time_to_first_token is not None:
        parts.append(f"first token {reply.time_to_first_token:.2f} s")
    parts.append(f"{reply.new_tokens} tokens")
    if reply.stop_reason:
        parts.append(STOP_REASONS[reply.stop_reason])
    if reply.left_out:
        parts.append(f"{reply.left_out} oldest messages left out to fit the context")
    return " · ".join(parts)


def render(reply: Reply, thinking: bool) -> list[dict]:
    """The reply as chat messages: collapsed reasoning (thinking models), the answer (or why there
    is none), and a statistics line once finished."""
    messages = []
    answer = reply.text
    if thinking:
        split = split_reasoning(reply.text)
        done = "done" if split.thinking_done or reply.stop_reason else "pending"
        messages.append({"role": "assistant", "content": split.reasoning or "…",
                         "metadata": {"title": "💭 Reasoning", "status": done}})
        answer = split.answer
        if not answer and reply.stop_reason:  # a display-only note: never sent back as an answer
            messages.append({"role": "assistant", "content": "",
                             "metadata": {"title": f"ℹ️ {NO_ANSWER[reply.stop_reason]}", "status": "done"}})
    if answer or not thinking:
        messages.append({"role": "assistant", "content": answer or ("…" if reply.stop_reason is None else "(no text)"),
                         "metadata": {}})
    if reply.stop_reason:
        messages.append({"role": "assistant", "content": "",
                         "metadata": {"title": f"⚡ {stats_line(reply)}", "status": "done"}})
    return messages


@dataclass
class Turn:
    """A reply being generated: `history` is what the chat shows before it (the user message
    included); `cancel` ends the generation between two decode steps."""

    history: list[dict]
    thinking: bool
    reply: Reply = field(default_factory=Reply)
    cancel: threading.Event = field(default_factory=threading.Event)
    discarded: bool = False  # the chat was cleared: show nothing more of this turn

    def messages(self, note: dict | None = None) -> list[dict]:
        """The chat as it should look now; `note` replaces the reply (a status line)."""
        return self.history + ([note] if note else render(self.reply, self.thinking))

    def stopped(self) -> list[dict]:
        """The chat after Stop: the reply so far with its statistics and the reason "stopped"."""
        self.cancel.set()
        reply = self.reply if self.reply.stop_reason else dataclasses.replace(self.reply, stop_reason="cancelled")
        return self.history + render(reply, self.thinking)


class RunningTurns:
    """The turn each browser session is answering (one at a time per session), for Stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: dict[str, Turn] = {}
        self._epochs: dict[str, int] = {}  # per session, raised by each discard (Clear, Undo)

    def epoch(self, session: str) -> int:
        """Stamp a turn with this when it is accepted: a turn accepted before a later discard
        (Clear pressed while it waited in the queue) must not start."""
        with self._lock:
            return self._epochs.get(session, 0)

    @contextmanager
    def track(self, session: str, turn: Turn) -> Iterator[Turn]:
        with self._lock:
            previous = self._turns.get(session)
            self._turns[session] = turn
        if previous is not None:  # a session answers one turn at a time: the new one replaces it
            previous.discarded = True
            previous.cancel.set()
        try:
            yield turn
        finally:
            with self._lock:
                if self._turns.get(session) is turn:
                    del self._turns[session]

    def stop(self, session: str, discard: bool = False) -> Turn | None:
        """Cancel the session's running turn (and hide the rest of it when `discard`); return it,
        or None when nothing runs."""
        with self._lock:
            turn = self._turns.get(session)
            if discard:
                self._epochs[session] = self._epochs.get(session, 0) + 1
        if turn is not None:
            turn.discarded = turn.discarded or discard
            turn.cancel.set()
        return turn


class SessionLimit:
    """At most `limit` requests of one client session at a time: an API client can send many at
    once, and each holds a decode slot that other users are waiting for."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._active: Counter[str] = Counter()

    @contextmanager
    def hold(self, session: str | None) -> Iterator[None]:
        with self._lock:
            if self._active[session] >= self.limit:
                raise UserError(f"You already have {self.limit} requests running; wait for one to finish.")
            self._active[session] += 1
        try:
            yield
        finally:
            with self._lock:
                self._active[session] -= 1
                if not self._active[session]:
                    del self._active[session]
