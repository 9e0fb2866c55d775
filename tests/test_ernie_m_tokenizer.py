"""Our tokenizers-only ErnieM tokenizer against transformers 4.56.2's ErnieMTokenizer and SentencePiece."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from ernie_m_reference import SAMPLES

from models import ErnieMTokenizer, load_tokenizer
from models.ernie_m_tokenizer import split_piece
from models.sentencepiece_model import parse_model, to_tokenizers, unigram_pieces_tokenizer


@pytest.mark.parametrize("name", ["trained", "lower", "factory"])
def test_ids_match_reference(ernie_m_reference, name):
    """Every text and pair of the multilingual corpus (twelve scripts, unknown scripts, digits,
    punctuation, full-width forms, emoji, whitespace runs, special tokens in text, empty text)."""
    spec, result, _ = ernie_m_reference
    ours = load_tokenizer(spec["tokenizers"][name])
    assert isinstance(ours, ErnieMTokenizer)
    expected = result["tokenizers"][name]
    assert len(expected) == len(spec["texts"]) > 25
    for (text, pair), ids in zip(spec["texts"], expected):
        assert ours.encode(text, pair) == ids, (text, pair)
        if pair is None:
            assert ours.encode(text, add_special_tokens=False) == ids[1:-1]


def test_reference_ids_are_not_trivial(ernie_m_reference):
    """The corpus exercises unknown pieces, the lower-casing switch and ErnieM's pair layout."""
    spec, result, _ = ernie_m_reference
    trained, lower = result["tokenizers"]["trained"], result["tokenizers"]["lower"]
    unk = load_tokenizer(spec["tokenizers"]["trained"]).unk_token_id
    assert unk == 3 and any(unk in ids for ids in trained)
    assert trained != lower
    pair_ids = trained[spec["texts"].index(("I love football.", "This example is sports."))]
    first = pair_ids.index(2)
    assert pair_ids[0] == 0 and pair_ids[first : first + 2] == [2, 2] and pair_ids[-1] == 2
    assert trained[spec["texts"].index(("", None))] == [0, 2]


def test_unigram_pieces_equal_sentencepiece(ernie_m_reference):
    spec, _, _ = ernie_m_reference
    data = (Path(spec["tokenizers"]["trained"]) / "sentencepiece.bpe.model").read_bytes()
    processor = spm.SentencePieceProcessor(model_proto=data)
    ours = unigram_pieces_tokenizer(parse_model(data))
    for text in SAMPLES:
        encoding = ours.encode(text, add_special_tokens=False)
        assert encoding.tokens == processor.encode_as_pieces(text), text
        assert encoding.ids == processor.encode_as_ids(text), text
    with pytest.raises(ValueError, match="only BPE"):
        to_tokenizers(parse_model(data))


def test_erniem_split_of_pieces():
    assert split_piece("▁9") == ["9"]
    assert split_piece("▁92000abc12") == ["92000", "abc", "12"]
    assert split_piece("▁你好,x") == ["你", "好", ",", "x"]
    assert split_piece("▁ab") == ["▁ab"]


def test_truncation_drops_tokens_from_the_text_only(ernie_m_reference, tmp_path):
    spec, _, _ = ernie_m_reference
    folder = shutil.copytree(spec["tokenizers"]["trained"], tmp_path / "tok")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.model_max_length == 512  # no limit in the files: the checkpoints' 514 positions less 2
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 40}))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.model_max_length == 38
    text, hypothesis = "Hello world, 你好世界 " * 10, "This example is sports."
    full = tokenizer.encode(text, hypothesis)
    ids, truncated = tokenizer.encode_truncated(text, hypothesis)
    assert truncated and len(ids) == 38 < len(full)
    tail = tokenizer.encode(hypothesis, add_special_tokens=False)
    assert ids[:-len(tail) - 3] == full[: len(ids) - len(tail) - 3] and ids[-len(tail) - 3 :] == [2, 2, *tail, 2]
    assert tokenizer.encode_truncated("short", hypothesis) == (tokenizer.encode("short", hypothesis), False)
    with pytest.raises(ValueError, match="second text"):
        tokenizer.encode_truncated("short", hypothesis * 10)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 20}))
    assert load_tokenizer(folder).model_max_length == 20
