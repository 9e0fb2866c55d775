"""Split a -Thinking model's output into reasoning and answer, as the serving engines do.

ERNIE-4.5-21B-A3B-Thinking writes `reasoning </think> answer`, the opening `<think>` usually
absent (the chat template opens it), and may wrap the answer in `<response>...</response>`
(vLLM's `ernie45` reasoning parser handles the same shapes)."""
from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"


@dataclass
class Split:
    reasoning: str
    answer: str
    thinking_done: bool


def split_reasoning(text: str) -> Split:
    """Everything before the first `</think>` is reasoning; until it appears, all of it is."""
    head, closed, tail = text.partition(THINK_CLOSE)
    reasoning = head.removeprefix(THINK_OPEN).strip()
    if not closed:
        return Split(reasoning, "", False)
    answer = tail.strip()
    if RESPONSE_OPEN.startswith(answer):  # nothing yet, or a half-streamed opening tag
        return Split(reasoning, "", True)
    answer = answer.removeprefix(RESPONSE_OPEN).split(RESPONSE_CLOSE, 1)[0]
    return Split(reasoning, answer.strip(), True)
