"""ErnieM's tokenizer (sentencepiece.bpe.model + vocab.txt) on the `tokenizers` library alone.

It reproduces transformers' slow `ErnieMTokenizer`: special tokens written in the text are cut out
first; every other span becomes SentencePiece unigram pieces, which are cut again around CJK
characters, some punctuation and digit runs (ERNIE-M's own rule), and each piece maps to its line
in vocab.txt, not to its SentencePiece id.
"""
from __future__ import annotations

import re
from pathlib import Path

from .sentencepiece_model import parse_model, unigram_pieces_tokenizer
from .tokenizer import _content, _read_json

DEFAULT_SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
# The reference's order of special-token attributes: ids of special tokens absent from vocab.txt follow it.
SPECIAL_TOKEN_ORDER = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PUNCTUATION = set(",;:.?!~，；：。？！《》【】")
SPACE = "▁"
UNBOUNDED = 10**12  # transformers writes ~1e30 as model_max_length when a checkpoint sets none


def is_ernie_m_folder(folder: Path) -> bool:
    return (folder / "sentencepiece.bpe.model").is_file() and (folder / "vocab.txt").is_file()


def _is_cut(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or char in PUNCTUATION


def split_piece(piece: str) -> list[str]:
    """ERNIE-M's second cut of one SentencePiece piece: each CJK character and punctuation mark
    alone, a cut at every digit/non-digit boundary; a fragment that is only "▁" is dropped."""
    out, start = [], 0
    for i, char in enumerate(piece):
        if char == SPACE:
            continue
        boundary = i > 0 and char.isdigit() != piece[i - 1].isdigit()
        if _is_cut(char) or boundary:
            if i > start and piece[start:i] != SPACE:
                out.append(piece[start:i])
            if _is_cut(char):
                out.append(char)
                start = i + 1
            else:
                start = i
    if len(piece) > start:
        out.append(piece[start:])
    return out


class ErnieMTokenizer:
    """`encode(text, pair)` gives the ids transformers' ErnieMTokenizer gives for `tokenizer(text, pair)`."""

    def __init__(self, spm_model: bytes, vocab: list[str], config: dict, model_max_length: int) -> None:
        self.backend = unigram_pieces_tokenizer(parse_model(spm_model))
        self.vocab = {token: i for i, token in enumerate(vocab)}
        self.do_lower_case = bool(config.get("do_lower_case", False))
        self.model_max_length = model_max_length
        names = {name: _content(config.get(name)) for name in SPECIAL_TOKEN_ORDER}
        self.special_tokens = {**DEFAULT_SPECIAL_TOKENS, **{k: v for k, v in names.items() if v is not None}}
        extra = [_content(t) for t in config.get("additional_special_tokens") or []]
        ordered = [self.special_tokens[n] for n in SPECIAL_TOKEN_ORDER if n in self.special_tokens] + extra
        self.special_ids: dict[str, int] = {}
        for token in dict.fromkeys(ordered):  # one absent from vocab.txt is appended, as the reference adds it
            self.special_ids[token] = self.vocab.get(token, len(self.vocab) + len(self.special_ids.keys() - self.vocab.keys()))
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def __len__(self) -> int:
        return len(self.vocab) + sum(t not in self.vocab for t in self.special_ids)

    def _id(self, name: str) -> int:
        return self.special_ids[self.special_tokens[name]]

    @property
    def cls_token_id(self) -> int:
        return self._id("cls_token")

    @property
    def sep_token_id(self) -> int:
        return self._id("sep_token")

    @property
    def pad_token_id(self) -> int:
        return self._id("pad_token")

    @property
    def unk_token_id(self) -> int:
        return self._id("unk_token")

    def tokenize(self, text: str) -> list[str]:
        """Tokens of `text` without [CLS]/[SEP]; special tokens in the text stay whole."""
        tokens = []
        for i, span in enumerate(self._special_pattern.split(text)):
            if i % 2:
                tokens.append(span)
            elif span:
                if self.do_lower_case:  # per character, as the reference does (no final-sigma rule)
                    span = "".join(c.lower() for c in span)
                tokens += self._pieces(span)
        return tokens

    def _pieces(self, text: str) -> list[str]:
        pieces = self.backend.encode(text, add_special_tokens=False).tokens
        out = []
        for i, piece in enumerate(pieces):
            if piece == SPACE:  # a lone "▁" stays only between pieces when the next lacks one
                if 0 < i < len(pieces) - 1 and not pieces[i + 1].startswith(SPACE):
                    out.append(SPACE)
            else:
                out += split_piece(piece)
        return out

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        unk = self.unk_token_id
        return [self.special_ids[t] if t in self.special_ids else self.vocab.get(t, unk) for t in tokens]

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text` (and `pair`): `[CLS] A [SEP]` or `[CLS] A [SEP] [SEP] B [SEP]`. Never truncates."""
        first = self.convert_tokens_to_ids(self.tokenize(text))
        second = None if pair is None else self.convert_tokens_to_ids(self.tokenize(pair))
        return self._join(first, second) if add_special_tokens else first + (second or [])

    def _join(self, first: list[int], second: list[int] | None) -> list[int]:
        cls, sep = self.cls_token_id, self.sep_token_id
        return [cls, *first, sep] if second is None else [cls, *first, sep, sep, *second, sep]

    def encode_truncated(self, text: str, pair: str | None = None, max_length: int | None = None) -> tuple[list[int], bool]:
        """Model input ids cut to `max_length` (default: the model's limit) by dropping tokens from
        the end of `text` only (transformers' "only_first"), and whether anything was dropped."""
        max_length = max_length or self.model_max_length
        first = self.convert_tokens_to_ids(self.tokenize(text))
        second = None if pair is None else self.convert_tokens_to_ids(self.tokenize(pair))
        excess = len(self._join(first, second)) - max_length
        if excess <= 0:
            return self._join(first, second), False
        if excess >= len(first):
            raise ValueError(f"the second text alone needs more than the {max_length} tokens the model takes")
        return self._join(first[:-excess], second), True


def load_ernie_m_tokenizer(folder: Path) -> ErnieMTokenizer:
    """The tokenizer of an ErnieM checkpoint folder; its length limit is the smaller of the
    tokenizer's `model_max_length` and the positions the model has (config.json)."""
    config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab = vocab[:-1] if vocab and vocab[-1] == "" else vocab  # one token per line, "\n" ended
    limits = [config.get("model_max_length") or UNBOUNDED]
    positions = _read_json(folder / "config.json").get("max_position_embeddings")
    if positions:
        limits.append(positions - 2)  # ErnieM's positions start at 2
    limit = min(limits)
    return ErnieMTokenizer((folder / "sentencepiece.bpe.model").read_bytes(), vocab, config, limit if limit < UNBOUNDED else 512)
