"""Tokenizer of the ERNIE 4.5 checkpoints on the `tokenizers` library alone (ErnieM's is in
ernie_m_tokenizer.py; `load_tokenizer` picks by the files present).

`tokenizer.json` is used when the checkpoint has one; otherwise `tokenizer.model` (SentencePiece
BPE) is converted once and the result cached on disk. Special tokens and the chat template come
from tokenizer_config.json and its companion files, as transformers reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from .chat_template import Span, render_chat_template, render_with_text_spans, resolve_chat_template
from .hub import resolve_checkpoint, studio_cache
from .sentencepiece_model import parse_model, to_tokenizers

if TYPE_CHECKING:
    from .ernie_m_tokenizer import ErnieMTokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")


def cache_dir() -> Path:
    return studio_cache("tokenizers")


def convert_sentencepiece(path: Path) -> Backend:
    """Convert a tokenizer.model once; later loads read the cached tokenizer.json."""
    data = path.read_bytes()
    cached = cache_dir() / f"{hashlib.sha256(data).hexdigest()}.json"
    if cached.is_file():
        return Backend.from_file(str(cached))
    backend = to_tokenizers(parse_model(data))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        backend.save(str(tmp))
        tmp.replace(cached)  # atomic: concurrent loaders never read a half-written file
    except OSError:
        pass  # a read-only cache only costs a conversion per load
    return backend


def _content(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text the new token completes.

    Text is decoded over a short window of recent ids so that what context-dependent decoders
    produce (spaces, byte-fallback runs) matches a full decode. A window ending in an incomplete
    UTF-8 sequence is held back, at most 4 byte tokens long (the longest UTF-8 character), so
    invalid bytes from a misbehaving model cannot stall the stream."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") and len(self._ids) - self._read < 4:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]


class Tokenizer:
    """encode/decode, special tokens and the chat template of one checkpoint."""

    def __init__(self, backend: Backend, config: dict, special_tokens: dict[str, str], chat_template: str) -> None:
        self.backend = backend
        self.config = config
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self._special_ids = frozenset(self.all_special_ids)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        added = self.backend.get_added_tokens_decoder()
        return sorted(i for i, token in added.items() if token.special)

    def encode(self, text: str, add_special_tokens: bool = False, text_spans: Sequence[Span] = ()) -> list[int]:
        """Token ids of `text`. Special tokens written in the text map to their ids (chat prompts
        rely on this), except inside `text_spans`, the (start, end) character ranges a user wrote:
        there a typed `<|end_of_sentence|>` or `<think>` is plain text, as transformers'
        split_special_tokens reads it. `add_special_tokens` prepends BOS only where the
        checkpoint asks for it."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids = encoding.ids
        if any(i in self._special_ids and self._in_spans(offsets, text_spans) for i, offsets in zip(ids, encoding.offsets)):
            ids = self._encode_typed_as_text(text, encoding, text_spans)
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    @cached_property
    def _text_backend(self) -> Backend:
        """A copy of the backend that reads special tokens as plain text (made when first needed)."""
        backend = Backend.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    @staticmethod
    def _in_spans(offsets: tuple[int, int], spans: Sequence[Span]) -> bool:
        return any(offsets[0] < end and offsets[1] > start for start, end in spans)

    def _encode_typed_as_text(self, text: str, encoding, text_spans: Sequence[Span]) -> list[int]:
        """The template's special tokens (those outside the spans) as ids, the text between them
        without special tokens: the same pieces the tokenizer itself splits the text into, so a
        prompt without typed special tokens gets the ids of a plain encode."""
        ids, cursor = [], 0
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id in self._special_ids and not self._in_spans((start, end), text_spans):
                ids += self._text_backend.encode(text[cursor:start], add_special_tokens=False).ids
                ids.append(token_id)
                cursor = end
        return ids + self._text_backend.encode(text[cursor:], add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` with the checkpoint's template; ValueError on template errors."""
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, **kwargs,
        )

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> tuple[str, list[Span]]:
        """The rendered prompt and the spans of the messages' own text in it (see `encode`)."""
        return render_with_text_spans(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, **kwargs,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Prompt ids of `messages`: the template's markers special, what the messages say text."""
        prompt, spans = self.render_chat(messages, add_generation_prompt, **kwargs)
        return self.encode(prompt, text_spans=spans)


def load_tokenizer(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Tokenizer | ErnieMTokenizer:
    """Load the tokenizer of a checkpoint (hub id or local folder): ErnieM's when the folder has
    its files (sentencepiece.bpe.model and vocab.txt), else the ERNIE 4.5 one."""
    folder = resolve_checkpoint(path_or_repo_id, revision)
    from .ernie_m_tokenizer import is_ernie_m_folder, load_ernie_m_tokenizer  # it imports this module

    if is_ernie_m_folder(folder):
        return load_ernie_m_tokenizer(folder)
    if (folder / "tokenizer.json").is_file():
        backend = Backend.from_file(str(folder / "tokenizer.json"))
    elif (folder / "tokenizer.model").is_file():
        backend = convert_sentencepiece(folder / "tokenizer.model")
    else:
        raise ValueError(f"{folder} has neither tokenizer.json nor tokenizer.model")

    config = _read_json(folder / "tokenizer_config.json")
    # Added tokens as transformers declares them: the config's decoder table, then added_tokens.json.
    declared = {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()}
    for token, i in _read_json(folder / "added_tokens.json").items():
        declared.setdefault(int(i), {"content": token, "special": True})
    already_added = {t.content for t in backend.get_added_tokens_decoder().values()}
    for token_id, token in sorted(declared.items()):
        content = token["content"]
        if content in already_added:
            continue
        if backend.token_to_id(content) not in (None, token_id) or (
            backend.token_to_id(content) is None and backend.get_vocab_size(with_added_tokens=True) != token_id
        ):
            raise ValueError(f"{folder}: added token {content!r} is declared with id {token_id}, which the vocabulary contradicts")
        options = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in token}
        backend.add_tokens([AddedToken(content, **{"normalized": False, "special": True, **options})])

    special_tokens = {}
    for source in (config, _read_json(folder / "special_tokens_map.json")):
        for name in SPECIAL_TOKEN_NAMES:
            if _content(source.get(name)) is not None:
                special_tokens[name] = _content(source[name])
    missing = [t for t in special_tokens.values() if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens(missing)
    return Tokenizer(backend, config, special_tokens, resolve_chat_template(folder, config))
