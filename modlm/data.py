"""The configured corpus as token ids: on-disk token cache and samplers.

`DataConfig` (defined in modlm.config, importable from here) names the corpus, its tokenizer and
its split. `prepare_data` loads the corpus (`load_corpus`, over the loaders in `modlm.corpus`; a
user corpus's validation tail gets at least `seq_len + 1` characters), builds the tokenizer or
reuses a given one, and returns the cached token ids of the train, validation and pydoc texts; a
train or validation split shorter than one training window (`seq_len + 1` tokens) is a
`DataError` that says what to change.

Token cache (`tokenize_cached`): each text is tokenized once and stored as a .npy file that later
runs memory-map. The file name is a hash of the text's SHA-256 and the tokenizer's `identity`, so
a changed corpus or tokenizer gets a new file and stale files are never read (each run still reads
and hashes the corpus text, which is cheap next to tokenizing it). Writes go to a
temporary file that `os.replace` moves into place, so a crash never leaves a half-written cache.
A trained BPE is cached the same way, keyed by its training text and vocabulary size. The cache
folder is `DataConfig.cache_dir`, else $MODLM_CACHE_DIR, else $XDG_CACHE_HOME/modlm/tokens
(~/.cache/modlm/tokens). A cache that cannot be written (read-only, full, not a folder) is still
read; what it lacks is tokenized (or trained) without caching, and one warning line per folder
says so and how to fix it.

Sampling: `TrainSampler` draws each step's global batch of `batch_size * world_size` random windows
of `seq_len + 1` tokens from one RNG seeded by (seed, step); rank r keeps rows r::world_size. A
step's batch is a pure function of (seed, step), so the sampler's state is those two ints and a
restored sampler continues exactly where the saved one stopped, and the ranks' rows of a step
together are exactly the single-process batch of size batch_size * world_size. `eval_batches`
walks a split sequentially in windows with stride `seq_len`, so every token after the first is a
target exactly once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from modlm import atomic
from modlm.config import DataConfig
from modlm.corpus import (
    Corpus,
    DataError,
    load_builtin_corpus,
    load_pydoc_text,
    load_user_corpus,
)
from modlm.tokenizer import (
    BPETokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    load_tokenizer,
)

CACHE_DIR_ENV = "MODLM_CACHE_DIR"
# Part of every cache key: bump it when the cache's file layout changes. Changes to the text itself
# (converter, joining) need no bump, since keys hash the text.
CACHE_VERSION = 1


# ---- token cache ---------------------------------------------------------------------------------

class CachedTokens(NamedTuple):
    """Token ids of one text (memory-mapped when non-empty, unless the cache could not be
    written), their cache file, and whether they were read from the cache (False: tokenized by
    this call)."""

    ids: np.ndarray
    path: Path
    from_cache: bool


def default_cache_dir() -> Path:
    """$MODLM_CACHE_DIR if set, else $XDG_CACHE_HOME/modlm/tokens, else ~/.cache/modlm/tokens."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "modlm" / "tokens"


def resolve_cache_dir(config: DataConfig) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()


def tokenize_cached(text: str, tokenizer: Tokenizer,
                    cache_dir: str | os.PathLike[str]) -> CachedTokens:
    """Token ids of `text`, read from `cache_dir` when this text and tokenizer were seen before."""
    cache_dir = Path(cache_dir)
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = _hash(f"tokens-v{CACHE_VERSION}", tokenizer.identity, text_hash)
    path = cache_dir / f"{tokenizer.name}-{key}.npy"
    try:
        ids = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        ids = None  # absent, or unreadable (e.g. truncated by a full disk): tokenize below
    if ids is not None and ids.ndim == 1 and ids.dtype == tokenizer.dtype:
        return CachedTokens(ids, path, True)
    ids = np.ascontiguousarray(tokenizer.encode_array(text), dtype=tokenizer.dtype)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_open(path, "wb") as f:
            np.save(f, ids)
    except OSError as e:
        _warn_unwritable(cache_dir, e)
        return CachedTokens(ids, path, False)
    return CachedTokens(np.load(path, mmap_mode="r"), path, False)


def cached_bpe(train_text: str, vocab_size: int,
               cache_dir: str | os.PathLike[str]) -> tuple[BPETokenizer, bool]:
    """A BPE trained on `train_text`, loaded from `cache_dir` if trained before; and whether it
    was trained by this call."""
    cache_dir = Path(cache_dir)
    key = _hash(f"bpe-v{CACHE_VERSION}", str(vocab_size),
                hashlib.sha256(train_text.encode("utf-8")).hexdigest())
    target = cache_dir / f"bpe-tokenizer-{key}"
    try:
        cached = target.is_dir()
    except OSError:     # e.g. a cache folder this process may not search: trained below
        cached = False
    if cached:
        try:
            tok = load_tokenizer(target)
        except (TokenizerError, OSError, ValueError):
            tok = None
        if isinstance(tok, BPETokenizer):
            return tok, False
        shutil.rmtree(target, ignore_errors=True)
    tok = BPETokenizer.train(train_text, vocab_size)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}."))
    except OSError as e:
        _warn_unwritable(cache_dir, e)
        return tok, True
    try:
        tok.save(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _warn_unwritable(cache_dir, e)
        return tok, True
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process stored the same tokenizer first; theirs is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    return tok, True


_warned_unwritable: set[Path] = set()


def _warn_unwritable(cache_dir: Path, e: OSError) -> None:
    """One line per folder and process: the cache could not be written, and the fix."""
    if cache_dir in _warned_unwritable:
        return
    _warned_unwritable.add(cache_dir)
    print(f"modlm: warning: cannot write the token cache {cache_dir} "
          f"({e.strerror or type(e).__name__}); going on without caching, so the next run "
          f"tokenizes again: set data.cache_dir or ${CACHE_DIR_ENV} to a writable folder",
          file=sys.stderr, flush=True)


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


# ---- everything a run needs --------------------------------------------------------------------

def load_corpus(config: DataConfig) -> Corpus:
    """The corpus `config` names (built-in Shakespeare when `config.corpus` is None)."""
    if config.corpus is None:
        return load_builtin_corpus()
    return load_user_corpus(config.corpus, corpus_format=config.corpus_format,
                            text_field=config.text_field, extensions=config.extensions,
                            val_fraction=config.val_fraction, min_val_chars=config.seq_len + 1)


@dataclass(frozen=True)
class PreparedData:
    """Token ids of every split, the tokenizer that made them, and what this call had to compute.

    train / val / pydoc: 1-D memory-mapped id arrays (dtype from the tokenizer's vocabulary).
    val_bytes / pydoc_bytes: UTF-8 size of those texts, for bits-per-byte.
    tokenized: which of "train", "val", "pydoc" were tokenized now rather than read from cache.
    trained_tokenizer: whether a BPE was trained now rather than read from cache.
    """

    tokenizer: Tokenizer
    corpus_name: str
    train: np.ndarray
    val: np.ndarray
    pydoc: np.ndarray
    val_bytes: int
    pydoc_bytes: int
    tokenized: tuple[str, ...]
    trained_tokenizer: bool


def prepare_data(config: DataConfig, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Load the corpus, build (or reuse `tokenizer`, e.g. one loaded from a run being resumed),
    and return the cached token ids of the train, validation and pydoc texts.

    Raises DataError when a split is shorter than one training window (seq_len + 1 tokens).
    """
    corpus = load_corpus(config)
    cache_dir = resolve_cache_dir(config)
    trained = False
    if tokenizer is None:
        if config.tokenizer == "bpe":
            tokenizer, trained = cached_bpe(corpus.train[:config.bpe_train_chars],
                                            config.bpe_vocab_size, cache_dir)
        else:
            tokenizer = build_tokenizer("bytes" if config.tokenizer == "auto"
                                        else config.tokenizer)
    elif config.tokenizer not in ("auto", tokenizer.name):
        raise DataError(f"the data config names tokenizer {config.tokenizer!r} but a "
                        f"{tokenizer.name!r} tokenizer was passed; make them agree")
    pydoc_text = load_pydoc_text()
    texts = {"train": corpus.train, "val": corpus.val, "pydoc": pydoc_text}
    parts = {name: tokenize_cached(text, tokenizer, cache_dir) for name, text in texts.items()}
    train, val = parts["train"].ids, parts["val"].ids
    need = config.seq_len + 1
    where = f"corpus {corpus.name} with the {tokenizer.name!r} tokenizer"
    if len(train) + len(val) < need:
        raise DataError(f"{where} is {len(train) + len(val)} tokens, shorter than one training "
                        f"sequence (seq_len + 1 = {need}); use a longer corpus or a smaller "
                        f"seq_len")
    if len(train) < need or len(val) < need:
        raise DataError(f"{where} splits into {len(train)} training and {len(val)} validation "
                        f"tokens, but each needs at least seq_len + 1 = {need}; use a longer "
                        f"corpus, a smaller seq_len, or a different val_fraction (now "
                        f"{config.val_fraction})")
    return PreparedData(
        tokenizer=tokenizer, corpus_name=corpus.name, train=train, val=val,
        pydoc=parts["pydoc"].ids, val_bytes=len(corpus.val.encode("utf-8")),
        pydoc_bytes=len(pydoc_text.encode("utf-8")),
        tokenized=tuple(name for name, p in parts.items() if not p.from_cache),
        trained_tokenizer=trained)


# ---- sampling ----------------------------------------------------------------------------------

class Batch(NamedTuple):
    """Model inputs and next-token targets, both (B, T) int64."""

    inputs: torch.Tensor
    targets: torch.Tensor


def split_windows(windows: torch.Tensor) -> Batch:
    """(B, T + 1) windows -> inputs w[:, :-1] and targets w[:, 1:]."""
    return Batch(windows[:, :-1], windows[:, 1:])


class TrainSampler:
    """Seeded, resumable, shardable random windows of `seq_len + 1` tokens.

    Step s draws `batch_size * world_size` window starts, uniform over every valid start, from
    numpy's default generator seeded with (seed, s); this rank returns rows rank::world_size. The
    only state is (seed, step), saved and restored with `state_dict` / `load_state_dict`.
    """

    def __init__(self, ids: np.ndarray, *, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if ids.ndim != 1:
            raise DataError(f"token ids must be 1-D, got shape {ids.shape}")
        _require_int("batch_size", batch_size, 1)
        _require_int("seq_len", seq_len, 1)
        _require_int("seed", seed, 0)
        _require_int("world_size", world_size, 1)
        _require_int("rank", rank, 0)
        if rank >= world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(ids) < seq_len + 1:
            raise DataError(f"{len(ids)} tokens cannot fill one window of seq_len + 1 = "
                            f"{seq_len + 1}; use more text or a smaller seq_len")
        self.ids = ids
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.step = 0

    def batch_at(self, step: int) -> torch.Tensor:
        """This rank's (batch_size, seq_len + 1) int64 windows for `step`; no state changes."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.ids) - self.seq_len,
                              size=self.batch_size * self.world_size)
        return _gather(self.ids, starts[self.rank::self.world_size], self.seq_len)

    def next_batch(self) -> torch.Tensor:
        """The current step's windows; advances the step."""
        windows = self.batch_at(self.step)
        self.step += 1
        return windows

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        missing = {"seed", "step"} - set(state)
        if missing:
            raise DataError(f"sampler state lacks {sorted(missing)}; expected keys seed and step")
        _require_int("seed", state["seed"], 0)
        _require_int("step", state["step"], 0)
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def eval_batches(ids: np.ndarray, *, batch_size: int, seq_len: int,
                 max_batches: int | None = None, rank: int = 0,
                 world_size: int = 1) -> Iterator[torch.Tensor]:
    """Sequential (<= batch_size, seq_len + 1) int64 windows over `ids`, the same every call.

    Window k starts at token k * seq_len, so consecutive windows share one token and every token
    after the first is a target exactly once; a trailing remainder shorter than a window is left
    out. Batches follow the training convention for ranks (global batch of
    batch_size * world_size windows, rank r keeps rows r::world_size), and every rank gets the same
    number of batches, so the last one may be short or even empty on some ranks.
    `max_batches` stops early; None walks the whole split.
    """
    _require_int("batch_size", batch_size, 1)
    _require_int("seq_len", seq_len, 1)
    _require_int("world_size", world_size, 1)
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if max_batches is not None:
        _require_int("max_batches", max_batches, 0)
    n_windows = max(0, (len(ids) - 1) // seq_len)
    global_batch = batch_size * world_size
    for b, lo in enumerate(range(0, n_windows, global_batch)):
        if max_batches is not None and b >= max_batches:
            return
        starts = np.arange(lo, min(lo + global_batch, n_windows), dtype=np.int64) * seq_len
        yield _gather(ids, starts[rank::world_size], seq_len)


def _gather(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    index = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    return torch.from_numpy(np.asarray(ids[index], dtype=np.int64))


def _require_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
