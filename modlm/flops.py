"""FLOPs and parameters from a config alone: the one place the project counts compute.

Convention (the same as `torch.utils.flop_counter.FlopCounterMode`, which a test checks):
- 2 FLOPs per multiply-add; only matrix products count (linear layers, the two attention
  products Q K^T and P V). Norms, rotary, activations, softmax, residual adds, gather and scatter
  are not counted.
- Attention scores count the full n x n product for the n tokens taking part (n = T in a dense
  block, n = k in a routed one): what an unmasked kernel computes. A causal kernel that skips the
  masked half does less; the convention is the standard one (Kaplan et al.; Chinchilla).
- A routed block processes k = capacity_k(T, capacity) tokens (paper Sec 3.4), so its
  projections and MLP cost k/T and its attention products (k/T)^2 of a dense block's (at the
  12.5% capacity of paper Sec 4.1 the scores cost 1/64). Its router (2 D FLOPs per token) and
  predictor run on all T. In the causal modes the routed count varies; these numbers are for
  exactly k. A threshold router routes a varying count in every mode: its numbers are for a
  block at its capacity, which its penalty aims for. An A-MoD block's router is the Q K^T
  product its previous block forms to read the attention each token received (2 T^2 D FLOPs),
  with no backward.
- A block that routes keys and values apart from its queries (`routing.kv_capacity`) takes
  keys and values from k_kv = capacity_k(T, kv_capacity) tokens: each of them pays the q, k, v
  projection (a key/value-only token's query is computed and discarded, block.decoupled_update),
  the k queries pay the output projection and the MLP, and the attention products cost
  2 x 2 x k x k_kv x D. Its predictor has a second output (P more FLOPs per token x 2).
- Training = forward + backward, the backward costing twice the forward (input and weight
  gradients) for every matmul, with three exceptions where autograd does less: the predictor's
  first layer has a stop-gradient input, so only its weight gradient is computed; a predictor
  whose loss weight is 0 and a router that no loss reaches (router_weight "constant" with aux
  weight 0) run forward only.
- The embedding lookup is free; the LM head is a D x V matmul on every token.
- An MoE MLP (modlm/moe.py) costs its router (2 D A FLOPs per token, A = experts + no-op
  experts) plus the expert matmuls of the choice slots a real expert computes. That count depends
  on where tokens go, so the FLOP module gives the expectation under balanced routing (what the
  load-balancing loss aims for): each of the A choices receives tokens * top_k / A slots, a real
  expert computes min(that, its slots), no-op choices compute nothing. `moe_mlp_flops` gives
  the exact number for measured per-expert counts.

Helpers size a MoD model to a dense model's forward FLOPs (the paper's isoFLOP rule, Sec 4.1:
the best MoD uses as many FLOPs per forward pass as the best dense model, with more parameters)
and convert a FLOP budget to optimizer steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from modlm.config import ModelConfig, RoutingConfig
from modlm.moe import slots_per_expert
from modlm.routing import capacity_k

SCORING_ROUTERS = ("learned", "threshold")     # routers with a weight vector: r = w^T x (+ b)
COMPONENTS = ("attention_projections", "attention_scores", "mlp", "router", "predictor",
              "moe_router", "lm_head")


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs for one sequence of `seq_len` tokens, by component."""

    seq_len: int
    attention_projections: float
    attention_scores: float
    mlp: float
    router: float
    predictor: float
    moe_router: float
    lm_head: float

    @property
    def total(self) -> float:
        return sum(getattr(self, c) for c in COMPONENTS)

    @property
    def per_token(self) -> float:
        return self.total / self.seq_len

    def as_dict(self) -> dict[str, float]:
        return {c: getattr(self, c) for c in COMPONENTS} | {"total": self.total}


def tokens_per_block(cfg: ModelConfig, seq_len: int) -> list[int]:
    """How many tokens take part in each block: T in dense blocks, k in routed ones."""
    routed = set(cfg.routed_layers)
    return [capacity_k(seq_len, cfg.capacity_of(i)) if i in routed else seq_len
            for i in range(cfg.n_layers)]


def kv_tokens(cfg: ModelConfig, layer: int, seq_len: int, queries: int) -> int:
    """Tokens that give block `layer` keys and values: k_kv in a block that routes them apart
    from its queries (`routing.kv_capacity`), else its `queries` themselves."""
    kv = cfg.kv_capacity_of(layer) if layer in cfg.routed_layers else None
    return queries if kv is None else max(queries, capacity_k(seq_len, kv))


def predictor_flops_per_token(cfg: ModelConfig) -> float:
    """The predictors of every routed block on one token: Linear(D, P), then Linear(P, 1), or
    Linear(P, 2) in a block that routes keys and values apart."""
    D, P = cfg.d_model, cfg.predictor_hidden
    return sum(2 * (D * P + P * (1 if cfg.kv_capacity_of(i) is None else 2))
               for i in cfg.routed_layers)


def expected_expert_tokens(cfg: ModelConfig, tokens: int) -> float:
    """Choice slots the real experts of one MoE layer compute for a group of `tokens` tokens,
    under balanced routing: experts * min(tokens * top_k / choices, slots_per_expert)."""
    m = cfg.moe
    share = tokens * m.top_k / m.choices
    cap = slots_per_expert(tokens, m.top_k, m.choices, m.capacity_factor)
    return m.experts * min(share, cap)


def moe_mlp_flops(cfg: ModelConfig, expert_tokens: float) -> float:
    """Expert matmul FLOPs for `expert_tokens` computed choice slots."""
    return 2 * expert_tokens * (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * cfg.expert_hidden


def forward_flops(cfg: ModelConfig, seq_len: int | None = None) -> FlopBreakdown:
    """Forward FLOPs for one sequence (default length: cfg.max_seq_len)."""
    T = cfg.max_seq_len if seq_len is None else seq_len
    D, F, V = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    moe_layers = set(cfg.moe_layers)
    proj = scores = mlp = moe_router = 0.0
    attention_only = cfg.routing.skip == "attention"
    for i, n in enumerate(tokens_per_block(cfg, T)):
        n_kv = kv_tokens(cfg, i, T, n)
        proj += 2 * n * 4 * D * D                 # q, k, v and output projections
        proj += 2 * (n_kv - n) * 3 * D * D        # q, k, v of key/value-only tokens
        scores += 2 * 2 * n * n_kv * D            # Q K^T and P V over all heads
        if attention_only:
            n = T                                 # the MLP runs on every token
        if i in moe_layers:
            moe_router += 2 * n * D * cfg.moe.choices
            mlp += moe_mlp_flops(cfg, expected_expert_tokens(cfg, n))
        else:
            mlp += 2 * n * mlp_mats * D * F
    n_routed = len(cfg.routed_layers)
    if cfg.routing.router in SCORING_ROUTERS:
        router = 2 * T * D * n_routed                     # r = w^T x (+ b) per token
    elif cfg.routing.router == "attention":
        # A-MoD: the block before each routed block forms its attention matrix, Q K^T over all
        # heads, to sum what each token received (router.attention_received).
        router = 2 * T * T * D * n_routed
    else:
        router = 0.0
    predictor = T * predictor_flops_per_token(cfg) if cfg.routing.predictor else 0.0
    return FlopBreakdown(T, proj, scores, mlp, router, predictor, moe_router, 2 * T * D * V)


def decode_flops(cfg: ModelConfig, context: float,
                 routed_fraction: float | Mapping[int, float] | None = None,
                 mode: Literal["router", "predictor"] = "router",
                 kv_fraction: float | Mapping[int, float] | None = None) -> FlopBreakdown:
    """Forward FLOPs of one decode step for one row: a new token whose `context` earlier tokens
    are in the KV cache (`seq_len` of the result is 1).

    A dense block runs the token's projections and MLP and attends over context + 1 keys (its
    own included). A routed block runs with probability f, its routed fraction (a number for
    every routed block, one per block, or None for each block's capacity), and its cache holds
    the routed share f of the context, so in expectation it costs f x (projections + MLP +
    attention over f x context + 1 keys): the FLOP limit of sampling from MoD. The causal rule
    runs on every token: in mode "router" the router (whose logit is also the routed token's
    weight), in mode "predictor" the predictor, and the router then scores the routed tokens
    alone. The LM head runs on every token. With f in {0, 1} the count is exact (tests check it
    against FlopCounterMode).

    A block that routes keys and values apart (`routing.kv_capacity`) gives a token its q, k, v
    projection with probability g >= f, its key/value fraction (`kv_fraction`, given like
    `routed_fraction`; None: its kv_capacity), and its cache holds the share g of the context:
    it costs f x (output projection + MLP + attention over g x context + 1 keys) + g x the
    q, k, v projection.
    """
    D, F, V = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    routed = set(cfg.routed_layers)
    attention_only = cfg.routing.skip == "attention"

    def fraction(i: int) -> float:
        if i not in routed:
            return 1.0
        if routed_fraction is None:
            return cfg.capacity_of(i)
        if isinstance(routed_fraction, Mapping):
            return routed_fraction.get(i, cfg.capacity_of(i))
        return routed_fraction

    def kv_share(i: int, f: float) -> float:
        kv = cfg.kv_capacity_of(i) if i in routed else None
        if kv is None:
            return f
        if isinstance(kv_fraction, Mapping):
            return max(f, kv_fraction.get(i, kv))
        return max(f, kv if kv_fraction is None else kv_fraction)

    proj = scores = mlp = moe_router = 0.0
    for i in range(cfg.n_layers):
        f = fraction(i)
        g = kv_share(i, f)
        keys = g * context + 1
        proj += f * 2 * D * D + g * 2 * 3 * D * D     # output projection; q, k, v
        scores += f * 2 * 2 * keys * D
        n = 1.0 if attention_only else f
        if i in cfg.moe_layers:
            moe_router += n * 2 * D * cfg.moe.choices
            mlp += n * moe_mlp_flops(cfg, expected_expert_tokens(cfg, 1))
        else:
            mlp += n * 2 * mlp_mats * D * F
    scored = (len(routed) if mode == "router" else sum(fraction(i) for i in routed))
    router = 2 * D * scored if cfg.routing.router in SCORING_ROUTERS else 0.0
    predictor = predictor_flops_per_token(cfg) if mode == "predictor" else 0.0
    return FlopBreakdown(1, proj, scores, mlp, router, predictor, moe_router, 2 * D * V)


def training_flops(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs for one sequence (see the module docstring)."""
    f = forward_flops(cfg, seq_len)
    r = cfg.routing
    total = 3 * f.total
    if r.predictor_loss_weight > 0:
        if r.predictor:   # its first layer (D x P per token and block) gets no input gradient
            total -= 2 * f.seq_len * cfg.d_model * cfg.predictor_hidden * len(cfg.routed_layers)
    else:
        total -= 2 * f.predictor
    if (r.router_weight == "constant" and r.aux_loss_weight == 0) or r.router == "attention":
        total -= 2 * f.router       # no gradient reaches the router: no backward for it
    return total


@dataclass(frozen=True)
class ParamCount:
    total: int          # what the optimizer updates (tied embeddings once)
    embedding: int      # token embedding (+ untied LM head)
    non_embedding: int  # blocks, routers, predictors, final norm


def param_count(cfg: ModelConfig) -> ParamCount:
    D, F, V = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    block = 4 * D * D + mlp_mats * D * F + 2 * D           # projections, MLP, two norms
    n_routed = len(cfg.routed_layers)
    router = {"learned": D, "threshold": D + 1}.get(cfg.routing.router, 0)
    P = cfg.predictor_hidden
    predictor = D * P + P if cfg.routing.predictor else 0
    # A block that routes keys and values apart: b_kv (learned router), a second predictor output.
    n_kv = sum(cfg.kv_capacity_of(i) is not None for i in cfg.routed_layers)
    offset = cfg.routing.router == "learned" and cfg.routing.aux_loss_weight > 0     # b_kv
    kv_extra = (1 if offset else 0) + (P if cfg.routing.predictor else 0)
    m = cfg.moe
    moe_extra = m.experts * mlp_mats * D * cfg.expert_hidden + D * m.choices - mlp_mats * D * F
    non_embedding = (cfg.n_layers * block + n_routed * (router + predictor) + n_kv * kv_extra + D
                     + len(cfg.moe_layers) * moe_extra)
    embedding = V * D * (1 if cfg.tie_embeddings else 2)
    return ParamCount(non_embedding + embedding, embedding, non_embedding)


def steps_for_budget(cfg: ModelConfig, budget_flops: float, batch_size: int,
                     seq_len: int | None = None) -> int:
    """Optimizer steps that spend `budget_flops` of training compute at this batch shape."""
    per_step = training_flops(cfg, seq_len) * batch_size
    steps = math.floor(budget_flops / per_step)
    if steps < 1:
        raise ValueError(f"a FLOP budget of {budget_flops:.3g} is less than one step "
                         f"({per_step:.3g} FLOPs at batch {batch_size}); raise the budget")
    return steps


def match_forward_flops(dense: ModelConfig, routing: RoutingConfig,
                        vary: Literal["n_layers", "d_model"] = "n_layers",
                        seq_len: int | None = None, limit: int = 512) -> ModelConfig:
    """The MoD config, grown from `dense` in depth or width, whose forward FLOPs per sequence are
    closest to the dense model's (paper Sec 4.1's isoFLOP rule; the paper found depth the better
    way to spend the savings). Width grows in steps that keep n_heads and an even head width.
    """
    target = forward_flops(dense, seq_len).total
    step = 1 if vary == "n_layers" else 2 * dense.n_heads
    start = getattr(dense, vary)
    best, best_gap = None, math.inf
    for value in range(start, start + limit * step, step):
        cand = dataclasses.replace(dense, routing=routing, **{vary: value})
        gap = abs(forward_flops(cand, seq_len).total - target)
        if gap < best_gap:
            best, best_gap = cand, gap
        elif forward_flops(cand, seq_len).total > target:
            break  # FLOPs grow monotonically with depth and width: past the target, stop.
    assert best is not None
    return best
