"""Named model presets: plain functions returning a `ModelConfig`.

Every preset is a MoD model with the paper's best routing (capacity 12.5%, every other block,
first block dense; Sec 4.1); the `-dense` twin of each is the same shape with no routing.

- tiny:       for tests and smoke runs (seconds on a CPU).
- small:      a CPU-friendly model: d 256, 6 layers, T 256, byte vocabulary.
- bench:      the benchmark shape of the speed targets: d 512, 8 layers, T 1024, bytes.
- gpt2-small: GPT-2-small-sized: d 768, 12 layers, 12 heads, T 1024, GPT-2 BPE vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from modlm.config import ConfigError, ModelConfig, RoutingConfig


def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, max_seq_len=128)


def small() -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=256, n_layers=6, n_heads=4, max_seq_len=256)


def bench() -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=512, n_layers=8, n_heads=8, max_seq_len=1024)


def gpt2_small() -> ModelConfig:
    return ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)


def dense(cfg: ModelConfig) -> ModelConfig:
    """The same shape with no routed block (no router, no predictor, no aux loss)."""
    return dataclasses.replace(cfg, routing=RoutingConfig(
        router="none", layers="none", predictor=False, aux_loss_weight=0.0))


_BASE: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny, "small": small, "bench": bench, "gpt2-small": gpt2_small}

PRESETS: dict[str, Callable[[], ModelConfig]] = {
    **_BASE, **{f"{name}-dense": (lambda f=f: dense(f())) for name, f in _BASE.items()}}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
