"""The model sizes the experiments train: a ladder of dense models and their isoFLOP MoD twins.

All models read bytes (vocabulary 256) in windows of T = 256, with head width 32 (24 for the
smallest), SwiGLU MLPs and tied embeddings, as the `small` preset. The MoD routing is the
paper's best (Sec 4.1, Fig 3): capacity 12.5% on every other block, block 0 dense, both causal
fixes trained (aux loss weight 0.01, predictor).

A MoD twin has the dense model's width and as many blocks as make its forward FLOPs per sequence
closest to the dense model's (`modlm.flops.match_forward_flops`, depth grown: the paper found
depth the better way to spend the savings), so twin and dense model cost the same per step and
get the same number of steps in a budget.
"""

from __future__ import annotations

import dataclasses

from modlm.config import ModelConfig, RoutingConfig
from modlm.flops import match_forward_flops
from modlm.presets import dense

SEQ_LEN = 256
MOD_ROUTING = RoutingConfig(capacity=0.125, layers="every_other")

# (d_model, n_layers, n_heads), growing by about 1.5-2x in parameters per rung.
LADDER: tuple[tuple[int, int, int], ...] = (
    (32, 3, 1), (48, 3, 2), (64, 4, 2), (96, 4, 3), (128, 4, 4), (128, 6, 4), (160, 6, 5),
    (192, 6, 6))


def dense_model(d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
    return dense(ModelConfig(vocab_size=256, d_model=d_model, n_layers=n_layers,
                             n_heads=n_heads, max_seq_len=SEQ_LEN))


def mod_twin(dense_cfg: ModelConfig, routing: RoutingConfig = MOD_ROUTING) -> ModelConfig:
    """The MoD model of the same width whose forward FLOPs match `dense_cfg`'s."""
    # Paper Sec 4.1: the optimal MoD uses as many FLOPs per forward pass as the optimal dense
    # model. Deviation: matched to the nearest whole block (within 8% here), not exactly.
    return match_forward_flops(dense_cfg, routing, vary="n_layers", seq_len=SEQ_LEN)


def with_routing(cfg: ModelConfig, **changes) -> ModelConfig:
    """`cfg` with some routing fields changed (validated)."""
    return dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, **changes))


def shape(cfg: ModelConfig) -> str:
    """A short name: d128-l8."""
    return f"d{cfg.d_model}-l{cfg.n_layers}"


def random_control(cfg: ModelConfig) -> ModelConfig:
    """The stochastic-routing control of a MoD model (paper Sec 4.1: "stochastic routing
    performed drastically worse"): the same shape and capacity, tokens routed by a random top-k,
    nothing to learn about routing (no predictor, no auxiliary loss). Its causal mode is
    `router` (each token routed with probability equal to the capacity)."""
    return with_routing(cfg, router="random", predictor=False, aux_loss_weight=0.0)

