"""Named presets: plain functions returning a `ModelConfig`, and the training presets built on them.

Every preset is a MoD model with the paper's best routing (capacity 12.5%, every other block,
first block dense; Sec 4.1); the `-dense` twin of each is the same shape with no routing.

- tiny:       for tests and smoke runs (seconds on a CPU).
- small:      a CPU-friendly model: d 256, 6 layers, T 256, byte vocabulary.
- bench:      the benchmark shape of the speed targets: d 512, 8 layers, T 1024, bytes.
- gpt2-small: GPT-2-small-sized: d 768, 12 layers, 12 heads, T 1024, GPT-2 BPE vocabulary.

Mixture-of-experts variants of `tiny` and `small` (paper Sec 4.3, Fig 7; modlm/moe.py), each the
base shape with 4 top-1 SwiGLU experts of the dense MLP's width in every block:
- `-moe`:             MoE, no MoD routing, capacity factor 1.25.
- `-mode-staged`:     MoD routing (12.5%, every other block) in front of the MoE blocks.
- `-mode-integrated`: no MoD routing; 4 no-op experts beside the 4 real ones (about half the
                      MLP compute is spent; attention is unchanged).
- `-moe-reduced`:     the paper's foil: MoE whose capacity factor is cut to 0.5 so it spends the
                      same MLP compute as integrated MoDE by dropping overflow tokens.

Training presets (`train_preset(name)`, the CLI's `--preset`): each model preset with a
`TrainConfig` sized for it; `configure(name, overrides)` adds the CLI's dotted `--set` overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from modlm.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    RoutingConfig,
    TrainConfig,
    apply_overrides,
)


def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, max_seq_len=128)


def small() -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=256, n_layers=6, n_heads=4, max_seq_len=256)


def bench() -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=512, n_layers=8, n_heads=8, max_seq_len=1024)


def gpt2_small() -> ModelConfig:
    return ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)


def dense(cfg: ModelConfig) -> ModelConfig:
    """The same shape with no routed block (no router, no predictor, no aux loss) and plain
    MLPs (no experts)."""
    return dataclasses.replace(cfg, moe=MoEConfig(), routing=RoutingConfig(
        router="none", layers="none", predictor=False, aux_loss_weight=0.0))


# Deviation: the paper states no expert count or capacities for MoDE (Sec 4.3); 4 experts, top-1
# and Switch Transformer's capacity factor 1.25 are our choices.
EXPERTS = 4


def moe(cfg: ModelConfig) -> ModelConfig:
    """The dense shape with an MoE MLP in every block (the mixture-of-experts baseline)."""
    return dataclasses.replace(dense(cfg), moe=MoEConfig(experts=EXPERTS))


def mode_staged(cfg: ModelConfig) -> ModelConfig:
    """Staged MoDE: the MoD routing of `cfg`, then MoE MLPs for the processed tokens."""
    return dataclasses.replace(cfg, moe=MoEConfig(experts=EXPERTS))


def mode_integrated(cfg: ModelConfig) -> ModelConfig:
    """Integrated MoDE: one router over real and no-op experts; no MoD routing."""
    return dataclasses.replace(dense(cfg), moe=MoEConfig(experts=EXPERTS, noop_experts=EXPERTS))


def moe_reduced(cfg: ModelConfig) -> ModelConfig:
    """The foil: MoE with capacity cut to integrated MoDE's expected MLP share (4 of 8 choices)."""
    return dataclasses.replace(dense(cfg), moe=MoEConfig(experts=EXPERTS, capacity_factor=0.5))


_BASE: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny, "small": small, "bench": bench, "gpt2-small": gpt2_small}
_VARIANTS: dict[str, Callable[[ModelConfig], ModelConfig]] = {
    "dense": dense, "moe": moe, "mode-staged": mode_staged, "mode-integrated": mode_integrated,
    "moe-reduced": moe_reduced}
_MOE_BASES = ("tiny", "small")

PRESETS: dict[str, Callable[[], ModelConfig]] = {
    **_BASE,
    **{f"{name}-{variant}": (lambda f=f, v=v: v(f()))
       for name, f in _BASE.items() for variant, v in _VARIANTS.items()
       if variant == "dense" or name in _MOE_BASES}}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def base_preset(name: str) -> str:
    """The shape a preset name builds on: 'small-mode-staged' -> 'small'."""
    for variant in _VARIANTS:
        if name.endswith(f"-{variant}") and name[:-len(variant) - 1] in _BASE:
            return name[:-len(variant) - 1]
    return name


# ---- training presets ----------------------------------------------------------------------------

def train_preset(name: str) -> TrainConfig:
    """A model preset with training defaults sized for it (the CLI's `--preset`)."""
    model = get_preset(name)
    base = base_preset(name)
    length = {"tiny": dict(steps=60, batch_size=8, eval_every=30, checkpoint_every=30,
                           warmup_steps=10, log_every=5, eval_batches=4),
              "small": dict(steps=300, batch_size=16, eval_every=100, checkpoint_every=100,
                            warmup_steps=30)}.get(base, dict(steps=1000))
    # The GPT-2-sized presets come with GPT-2's vocabulary, so they read text with its BPE.
    tokenizer = "gpt2" if base == "gpt2-small" else "bytes"
    return TrainConfig(model=model, data=DataConfig(seq_len=model.max_seq_len,
                                                    tokenizer=tokenizer),
                       preset=name, **length)


def configure(preset: str, overrides: Mapping[str, Any]) -> TrainConfig:
    """A training preset with dotted overrides (the CLI's `--preset` and `--set`). A length given
    as `tokens` or `flops` replaces the preset's `steps`; a `retrofit.source` without a
    `data.tokenizer` trains with the source model's own tokenizer."""
    overrides = dict(overrides)
    if ("tokens" in overrides or "flops" in overrides) and "steps" not in overrides:
        overrides["steps"] = None
    if "retrofit.source" in overrides and "data.tokenizer" not in overrides:
        overrides["data.tokenizer"] = "auto"   # the source model's own tokenizer (modlm.train)
    return apply_overrides(train_preset(preset), overrides)
