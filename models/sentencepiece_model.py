"""Read and write SentencePiece model files and convert them into `tokenizers`.

A SentencePiece model (ERNIE 4.5's BPE `tokenizer.model`, ErnieM's unigram
`sentencepiece.bpe.model`) is a protobuf `ModelProto`; the few fields a tokenizer needs are read
with a minimal wire-format codec, so neither `sentencepiece` nor `protobuf` is needed at run time.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
UNIGRAM_MODEL, BPE_MODEL = 1, 2  # TrainerSpec.ModelType


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class SentencePieceModel:
    """The fields of ModelProto that define tokenization (defaults as in sentencepiece_model.proto)."""

    pieces: list[Piece]
    model_type: int = 1
    byte_fallback: bool = False
    unk_id: int = 0
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    precompiled_charsmap: bytes = b""
    normalizer_name: str = "nmt_nfkc"


# --- protobuf wire format ------------------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, value) of a serialized message; values are int, float-bits or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}: not a SentencePiece model")
        yield number, value


def parse_model(data: bytes) -> SentencePieceModel:
    """Parse a serialized SentencePiece ModelProto."""
    pieces, trainer, normalizer = [], {}, {}
    for number, value in _fields(data):
        if number == 1:  # SentencePiece
            piece = Piece("")
            for n, v in _fields(value):
                if n == 1:
                    piece.piece = v.decode("utf-8")
                elif n == 2:
                    piece.score = struct.unpack("<f", v)[0]
                elif n == 3:
                    piece.type = v
            pieces.append(piece)
        elif number == 2:  # TrainerSpec
            trainer = dict(_fields(value))
        elif number == 3:  # NormalizerSpec
            normalizer = dict(_fields(value))
    if not pieces:
        raise ValueError("not a SentencePiece model: no pieces")
    return SentencePieceModel(
        pieces=pieces,
        model_type=trainer.get(3, 1),
        byte_fallback=bool(trainer.get(35, 0)),
        unk_id=trainer.get(40, 0),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)),
        precompiled_charsmap=normalizer.get(2, b""),
        normalizer_name=normalizer.get(1, b"nmt_nfkc").decode(),
    )


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _key(number, 0) + _encode_varint(value)


def serialize_model(model: SentencePieceModel) -> bytes:
    """Serialize to the ModelProto bytes `sentencepiece` itself reads."""
    out = bytearray()
    for p in model.pieces:
        body = _bytes_field(1, p.piece.encode()) + _key(2, 5) + struct.pack("<f", p.score)
        out += _bytes_field(1, body + _varint_field(3, p.type))
    trainer = _varint_field(3, model.model_type) + _varint_field(35, int(model.byte_fallback))
    trainer += _varint_field(40, model.unk_id)
    out += _bytes_field(2, trainer)
    normalizer = _bytes_field(1, model.normalizer_name.encode())
    if model.precompiled_charsmap:
        normalizer += _bytes_field(2, model.precompiled_charsmap)
    normalizer += _varint_field(3, int(model.add_dummy_prefix)) + _varint_field(4, int(model.remove_extra_whitespaces))
    normalizer += _varint_field(5, int(model.escape_whitespaces))
    out += _bytes_field(3, normalizer)
    return bytes(out)


# --- conversion ----------------------------------------------------------------------------------

def bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary.

    SentencePiece merges the adjacent pair whose union is the best-ranked piece (lowest id), so
    every split of a piece into two vocabulary pieces is a merge, ranked by the merged piece."""
    merges = []
    for piece, rank in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(rank, vocab[left], vocab[right], left, right) for left, right in splits]
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def to_tokenizers(model: SentencePieceModel) -> Tokenizer:
    """An equivalent `tokenizers.Tokenizer` for a SentencePiece BPE model (ERNIE's kind)."""
    if model.model_type != BPE_MODEL:
        raise ValueError(f"tokenizer.model is SentencePiece model type {model.model_type}, only BPE (2) is supported")
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    unk = model.pieces[model.unk_id].piece
    tokenizer = Tokenizer(BPE(vocab, bpe_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=model.byte_fallback))
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    # Control and user-defined pieces are matched whole, before BPE (digits in ERNIE's vocabulary).
    tokenizer.add_tokens(
        [AddedToken(p.piece, special=p.type == CONTROL, normalized=False) for p in model.pieces if p.type in (CONTROL, USER_DEFINED)]
    )
    return tokenizer


def unigram_pieces_tokenizer(model: SentencePieceModel) -> Tokenizer:
    """A `tokenizers.Tokenizer` whose tokens and ids are SentencePiece's `EncodeAsPieces` /
    `EncodeAsIds` for a unigram model (ErnieM's kind); an unknown run's token is its text.

    SentencePiece never matches control, unknown or unused pieces in text, while a `tokenizers`
    Unigram matches every vocabulary string, so those pieces keep their ids under a name no word can
    contain: the pre-tokenizer leaves a "▁" only at the start of a word, so never at the end of a
    longer string. User-defined pieces compete in the lattice with their score (SentencePiece
    always picks them; ErnieM's model is not known to have any)."""
    if model.model_type != UNIGRAM_MODEL:
        raise ValueError(f"SentencePiece model type {model.model_type} is not unigram (1)")
    if not model.escape_whitespaces:
        raise ValueError("SentencePiece models that do not escape whitespace are not supported")
    unmatchable = (CONTROL, UNKNOWN, UNUSED)
    vocab = [(p.piece + "▁" if p.type in unmatchable else p.piece, p.score) for p in model.pieces]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=model.unk_id, byte_fallback=model.byte_fallback))
    steps = [normalizers.Precompiled(model.precompiled_charsmap)] if model.precompiled_charsmap else []
    if model.remove_extra_whitespaces:  # of " " only, after the charsmap, as SentencePiece does
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ | $"), "")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    prepend = "always" if model.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=True)
    return tokenizer
