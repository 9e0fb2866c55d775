"""Render a checkpoint's own Jinja chat template, the way transformers renders it.

Hub templates are untrusted code, so they run in jinja2's immutable sandbox. The environment
(trim_blocks, lstrip_blocks, loop controls, raise_exception, strftime_now, a non-escaping tojson)
matches transformers', so prompts are byte-identical to what the model was tuned on.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)
Span = tuple[int, int]

# The documented ERNIE 4.5 text template (transformers' convert_ernie4_5_tokenizer.py), used only
# when a checkpoint ships none.
ERNIE_4_5_CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}\n"
    "    {%- set add_generation_prompt = true -%}\n"
    "{%- endif -%}\n"
    "{%- if not cls_token is defined -%}\n"
    '    {%- set cls_token = "<|begin_of_sentence|>" -%}\n'
    "{%- endif -%}\n"
    "{%- if not sep_token is defined -%}\n"
    '    {%- set sep_token = "<|end_of_sentence|>" -%}\n'
    "{%- endif -%}\n"
    "{{- cls_token -}}\n"
    "{%- for message in messages -%}\n"
    '    {%- if message["role"] == "user" -%}\n'
    '        {{- "User: " + message["content"] + "\\n" -}}\n'
    '    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n'
    '    {%- elif message["role"] == "system" -%}\n'
    '        {{- message["content"] + "\\n" -}}\n'
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    '    {{- "Assistant: " -}}\n'
    "{%- endif -%}"
)


def resolve_chat_template(folder: Path, tokenizer_config: dict) -> str:
    """The checkpoint's template: chat_template.jinja (transformers v5 saves it there), else
    tokenizer_config.json's `chat_template` (a string or named templates), else ERNIE 4.5's."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template or ERNIE_4_5_CHAT_TEMPLATE


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **kwargs,
) -> str:
    """Render `messages` ([{"role", "content"}, ...]) to the prompt string.

    Template errors, including the template's own `raise_exception` checks and malformed messages,
    surface as one ValueError with the template's message."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    variables = {**(special_tokens or {}), "tools": None, "documents": None, **kwargs}
    try:
        return compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"chat template error: {error}") from None


def render_with_text_spans(template: str, messages: list[dict], **kwargs) -> tuple[str, list[Span]]:
    """The prompt and the character spans in it that hold the messages' own text (contents and
    text parts), so that the tokenizer can read special tokens typed there as plain text.

    The messages are rendered once with unique markers in place of their text; the spans are
    trusted only if putting the text back gives exactly the plain rendering (a template that
    edits contents, e.g. strips them, gets no spans, and a warning in the log)."""
    prompt = render_chat_template(template, messages, **kwargs)
    nonce = secrets.token_hex(8)
    texts: list[str] = []

    def marked(value):
        if not isinstance(value, str):
            return value
        texts.append(value)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    def mark(message):
        if not isinstance(message, dict):
            return message
        content = message.get("content")
        if isinstance(content, list):
            content = [{**part, "text": marked(part["text"])} if isinstance(part, dict) and "text" in part else part for part in content]
        return {**message, "content": marked(content)}

    rendered = render_chat_template(template, [mark(m) for m in messages], **kwargs)
    pieces, spans = [], []
    cursor = length = 0
    for match in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", rendered):
        pieces.append(rendered[cursor : match.start()])
        length += match.start() - cursor
        text = texts[int(match.group(1))]
        spans.append((length, length + len(text)))
        pieces.append(text)
        length += len(text)
        cursor = match.end()
    pieces.append(rendered[cursor:])
    if "".join(pieces) != prompt:
        log.warning("the chat template edits message contents: special tokens typed in them are read as special")
        return prompt, []
    return prompt, [span for span in spans if span[0] < span[1]]
