"""Decoder layers and the Mixture-of-Depths routed layer (paper Sec 3.4, Eq. 1).

Legend: B batch, T time, K routed tokens per sequence, D model width, H query heads, G key/value
heads, Dh head width, N rows taking part.

Every layer is driven through one narrow interface, `DecoderLayer`: `project` (queries, keys and
values of the given tokens at their true positions), attention (`layers.attend`, over the tokens
themselves or a KV cache), `attn_out` (the out projection) and `mlp_update` (the MLP sublayer with
its norm), which `finish` combines into the layer's update. Its update f(x) is `causal_update`.
modlm's own `Block` implements it, and so do the wrapped Hugging
Face decoder layers of a retrofitted model (modlm.hf.retrofit), which is how the generation engine
runs both with one code path.

`RoutedLayer` puts a router (and optionally the causal predictor) in front of any such layer and
applies Eq. 1 through `routing.routed_update`:

    x_i' = x_i + w(r_i) * f_i(X~)   for the selected set X~,   x_i' = x_i otherwise,

with f computed on the gathered tokens alone (queries, keys and values from X~, positions and
causal mask by original position). Nothing is computed for unselected tokens and then masked away.
With `routing.skip = "attention"` only the attention sublayer is routed (Eq. 1 applied to the
attention update); the MLP sublayer then runs on every token, as in router-tuning of pretrained
models, which skips attention only.
With `routing.kv_capacity` a routed layer takes its keys and values from a larger set than its
queries (`decoupled_update`): the query set Q is the top-k of the router scores as above, the
key/value set KV the top-k_kv of the same scores (Q within KV); a token of KV outside Q gives keys
and values and gets no update, and each query attends causally, by true position, to the KV
tokens at or before it.
`RoutedBlock` is the routed layer around a modlm `Block`; a block's MLP may be a mixture of experts
(modlm/moe.py), and an MoD-routed block with an MoE MLP is the paper's staged MoDE (Sec 4.3).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modlm import routing
from modlm.config import ModelConfig
from modlm.layers import MLP, Attention, RMSNorm, Rotary, attend
from modlm.moe import MoE, MoERouting
from modlm.router import (
    AttentionRouter,
    LinearRouter,
    Predictor,
    RandomRouter,
    ThresholdRouter,
    attention_received,
)

RoutingMode = Literal["topk", "router", "predictor"]
ROUTING_MODES = ("topk", "router", "predictor")

# What a model's position encoding gives for some positions (modlm: rotary rotations; Llama:
# (cos, sin); GPT-2: None, its positions are in the embeddings).
PositionEncoding = Any
EncodePositions = Callable[[Tensor], PositionEncoding]


class DecoderLayer(Protocol):
    """One decoder layer as the routed update and the generation engine drive it.

    n_heads / n_kv_heads / head_dim: attention shape (grouped-query attention when they differ);
    attn_scale: the softmax scale (None: 1/sqrt(head_dim)); kv_dtype: what keys and values are.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    attn_scale: float | None

    @property
    def kv_dtype(self) -> torch.dtype: ...

    def project(self, x_BKD: Tensor, pe: PositionEncoding) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, K, H, Dh), keys and values (B, K, G, Dh) of the given tokens, queries and
        keys rotated at the positions `pe` encodes."""
        ...

    def attention_dropout(self) -> float:
        """Dropout on attention probabilities now (0 in eval mode)."""
        ...

    def attn_out(self, y_BHKd: Tensor) -> Tensor:
        """The attention sublayer's update from the heads' output (the out projection)."""
        ...

    def mlp_update(self, h_BKD: Tensor, valid_BK: Tensor | None = None,
                   drop_overflow: bool = True) -> tuple[Tensor, MoERouting | None]:
        """The MLP sublayer's update of the residual stream h (its norm included)."""
        ...


def finish(layer: DecoderLayer, x_BKD: Tensor, y_BHKd: Tensor, valid_BK: Tensor | None = None,
           drop_overflow: bool = True, mlp: bool = True) -> tuple[Tensor, MoERouting | None]:
    """f(x) given the attention heads' output: the update (never the residual itself), with the
    MLP sublayer, or without it (`mlp=False`: the attention update alone, for routing that skips
    attention only)."""
    attn_BKD = layer.attn_out(y_BHKd)
    if not mlp:
        return attn_BKD, None
    mlp_BKD, moe = layer.mlp_update(x_BKD + attn_BKD, valid_BK, drop_overflow)
    return attn_BKD + mlp_BKD, moe


class LayerUpdate(NamedTuple):
    """What `causal_update` computes: the update f(x), the MoE statistics (None without an MoE
    MLP), the (keys, values) a KV cache stores, and the attention each token received (A-MoD's
    routing score for the next block; None unless asked for)."""

    delta: Tensor
    moe: MoERouting | None
    kv: tuple[Tensor, Tensor]
    received: Tensor | None = None


def causal_update(layer: DecoderLayer, x_BKD: Tensor, pe: PositionEncoding,
                  valid_BK: Tensor | None = None, drop_overflow: bool = True,
                  mlp: bool = True, received: bool = False) -> LayerUpdate:
    """f(x) for tokens in time order attending causally among themselves. mlp=False: the
    attention update alone (see `finish`). received: also the attention each token received
    (`router.attention_received`), for an A-MoD block after this one."""
    q_BKHd, k_BKGd, v_BKGd = layer.project(x_BKD, pe)
    q_BHKd, k_BGKd = q_BKHd.transpose(1, 2), k_BKGd.transpose(1, 2)
    # The K axis is in time order, so is_causal masks by original position.
    y_BHKd = attend(q_BHKd, k_BGKd, v_BKGd.transpose(1, 2), scale=layer.attn_scale,
                    is_causal=True, dropout_p=layer.attention_dropout())
    delta_BKD, moe = finish(layer, x_BKD, y_BHKd, valid_BK, drop_overflow, mlp)
    got_BK = attention_received(q_BHKd, k_BGKd, layer.attn_scale) if received else None
    return LayerUpdate(delta_BKD, moe, (k_BKGd, v_BKGd), got_BK)


def decoupled_update(layer: DecoderLayer, x_BTD: Tensor, q_sel: routing.Selection, kv_BT: Tensor,
                     pos_BT: Tensor, encode: EncodePositions, weights_NK: Tensor,
                     drop_overflow: bool = True, mlp: bool = True
                     ) -> tuple[Tensor, MoERouting | None, routing.Selection,
                                tuple[Tensor, Tensor] | None]:
    """Eq. 1 with queries from `q_sel` (a selection of every row) and keys and values from the
    tokens of kv_BT (which holds every query): x_i' = x_i + w_i * f_i for the queries, where f's
    attention sees the key/value tokens at or before each query's true position; every other
    token is unchanged. Returns (new x, MoE statistics, the key/value selection, its (keys,
    values), which a KV cache stores; None when no token gives keys and values).

    Deviation: a key/value-only token goes through the layer's whole q, k, v projection (the one
    `DecoderLayer.project`, shared with retrofitted layers) and its query is discarded; modlm.flops
    counts that projection (docs/design.md).
    """
    kv_sel = routing.Selection.from_mask(kv_BT)
    if kv_sel.empty:
        return x_BTD, None, kv_sel, None
    pos_kv_NS = kv_sel.gather(pos_BT)
    q_NSHd, k_NSGd, v_NSGd = layer.project(kv_sel.gather(x_BTD), encode(pos_kv_NS))
    slot_BT = routing.slots_among(kv_BT)

    def compute(x_NKD: Tensor) -> tuple[Tensor, MoERouting | None]:
        slot_NK = q_sel.gather(slot_BT).clamp(min=0)       # each query's own key/value slot
        H, Dh = q_NSHd.shape[2:]
        q_NKHd = q_NSHd.gather(1, slot_NK[:, :, None, None].expand(-1, -1, H, Dh))
        mask_N1KS = routing.attention_mask_by_position(q_sel.gather(pos_BT), q_sel.valid_NK,
                                                       pos_kv_NS, kv_sel.valid_NK)
        y_NHKd = attend(q_NKHd.transpose(1, 2), k_NSGd.transpose(1, 2), v_NSGd.transpose(1, 2),
                        scale=layer.attn_scale, mask=mask_N1KS,
                        dropout_p=layer.attention_dropout())
        return finish(layer, x_NKD, y_NHKd, q_sel.valid_NK, drop_overflow, mlp)

    out_BTD, moe = routing.routed_update(x_BTD, q_sel, weights_NK, compute)
    return out_BTD, moe, kv_sel, (k_NSGd, v_NSGd)


class Block(nn.Module):
    """Pre-norm block: f(x) = attn(norm(x)) + mlp(norm(x + attn)) (a `DecoderLayer`)."""

    attn_scale = None

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module = MoE(cfg, layer) if layer in cfg.moe_layers else MLP(cfg)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.attn.qkv.weight.dtype

    def project(self, x_BKD: Tensor, rot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.attn.project(self.attn_norm(x_BKD), rot)

    def attention_dropout(self) -> float:
        return 0.0

    def update(self, x_BKD: Tensor, rot: Tensor, valid_BK: Tensor | None = None,
               drop_overflow: bool = True) -> tuple[Tensor, MoERouting | None]:
        """f(x) for the given tokens; `rot` is the rotary table at their true positions.

        valid_BK marks real tokens when rows are padded (an MoE MLP ignores the others);
        drop_overflow: an MoE MLP drops what overflows an expert's slots (training, `topk` mode).
        """
        return causal_update(self, x_BKD, rot, valid_BK, drop_overflow)[:2]

    def attn_out(self, y_BHKd: Tensor) -> Tensor:
        return self.attn.merge(y_BHKd)

    def mlp_update(self, h_BKD: Tensor, valid_BK: Tensor | None = None,
                   drop_overflow: bool = True) -> tuple[Tensor, MoERouting | None]:
        if isinstance(self.mlp, MoE):
            return self.mlp(self.mlp_norm(h_BKD), valid_BK, drop_overflow)
        return self.mlp(self.mlp_norm(h_BKD)), None

    def forward(self, x_BTD: Tensor, rotary: Rotary, mode: RoutingMode = "topk",
                received: bool = False) -> tuple[Any, ...]:
        """(x + f(x), MoE statistics), and with received=True also the attention each token
        received here (B, T): the scores of an A-MoD block after this one. (One entry point, so
        module hooks such as FSDP's weight gathering see every call.)"""
        rot_TR = rotary(torch.arange(x_BTD.shape[1], device=x_BTD.device))
        up = causal_update(self, x_BTD, rot_TR, drop_overflow=mode == "topk", received=received)
        if received:
            return x_BTD + up.delta, up.moe, up.received
        return x_BTD + up.delta, up.moe


@dataclass(frozen=True)
class LayerRouting:
    """What one routed block did, for losses, logging and analysis (all tensors detached
    except the two losses).

    mask_BT: True where the token went through the block. weights_BT: the router weight each
    token would receive (sigmoid(r), r or 1 per `router_weight`). fraction: routed share of tokens.
    predictor_accuracy / router_accuracy: agreement of the causal decisions (predictor logit > 0,
    sigmoid(r) > 0.5) with top-k membership; None where that part does not exist.
    kv_mask_BT / kv_fraction: the tokens that gave the block keys and values, and their share,
    when it routes them apart from its queries (`routing.kv_capacity`); None otherwise (keys and
    values then come from mask_BT's tokens).
    """

    layer: int
    k: int
    mask_BT: Tensor
    weights_BT: Tensor
    fraction: Tensor
    router_aux_loss: Tensor | None
    predictor_loss: Tensor | None
    router_accuracy: Tensor | None
    predictor_accuracy: Tensor | None
    moe: MoERouting | None = None    # the block's MoE MLP on the routed tokens (staged MoDE)
    kv_mask_BT: Tensor | None = None
    kv_fraction: Tensor | None = None


class RoutedLayer(nn.Module):
    """A router (Sec 3.4), optionally the causal predictor (Sec 3.5, fix 2), and the routed update
    of Eq. 1 around a `DecoderLayer` (`inner`, given by the subclass).

    gain: with True, the weight on a routed update is `2 * sigmoid(g * r)` (or `1 + g * r` for
    router_weight "raw") with a learned gain g that starts at 0, so every routed update starts
    with weight exactly 1 (retrofitting a pretrained model); otherwise Eq. 1's weights.
    """

    def __init__(self, cfg: ModelConfig, layer: int, gain: bool = False) -> None:
        super().__init__()
        r = cfg.routing
        self.index = layer
        self.capacity = cfg.capacity_of(layer)
        # Deviation: the paper's routed token skips the whole block; skip="attention" routes
        # the attention sublayer alone (router-tuning of pretrained models; docs/design.md).
        self.attention_only = r.skip == "attention"
        self.kind = r.router
        self.learned = r.router == "learned"
        # A threshold router decides token by token in every mode (causal by construction).
        self.thresholded = r.router == "threshold"
        self.weighting = "constant" if r.router in ("random", "attention") else r.router_weight
        self.router: nn.Module = _ROUTERS[r.router](cfg.d_model)
        # Decoupled key/value routing (None: keys and values from the queries, the paper's block).
        self.kv_capacity = cfg.kv_capacity_of(layer)
        kv = self.kv_capacity is not None
        self.predictor = (Predictor(cfg.d_model, cfg.predictor_hidden, 2 if kv else 1)
                          if r.predictor else None)
        # Deviation: the paper leaves decoupled routing to future work (Sec 5); the learned
        # router's key/value rule is r + b_kv > 0 with b_kv learned from 0 by the auxiliary loss
        # (docs/design.md); without that loss nothing would train it, so there is none.
        self.kv_offset = (nn.Parameter(torch.zeros(()))
                          if kv and self.learned and r.aux_loss_weight > 0 else None)
        # Deviation: a gain that starts at 0 makes every routed update's weight exactly 1 at the
        # start, so a retrofitted model begins where the pretrained one is (docs/design.md).
        self.gain = (nn.Parameter(torch.zeros(()))
                     if gain and self.weighting in ("sigmoid", "raw") else None)

    @property
    def inner(self) -> DecoderLayer:
        raise NotImplementedError

    def router_weights(self, logits_BT: Tensor) -> Tensor:
        if self.weighting == "constant":
            return torch.ones_like(logits_BT)
        if self.gain is not None:
            z_BT = self.gain.float() * logits_BT
            return 2.0 * torch.sigmoid(z_BT) if self.weighting == "sigmoid" else 1.0 + z_BT
        # Deviation: sigmoid(r) by default, not Eq. 1's raw r; the paper's figures show weights
        # in [0, 1] with 0.5 as the decision line (docs/design.md).
        if self.weighting == "sigmoid":
            return torch.sigmoid(logits_BT)
        return logits_BT  # "raw": Eq. 1 as written, x + r * f

    def rule(self, mode: RoutingMode) -> RoutingMode:
        """The rule that decides in a routing mode: a threshold router's own ("router") in
        every mode, otherwise the mode's."""
        return "router" if self.thresholded else mode

    def causal_decision(self, x_BTD: Tensor, mode: RoutingMode,
                        generator: torch.Generator | None = None, prior_BT: Tensor | None = None
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Router logits (float32), predictor logits (None without a predictor) and, in a causal
        mode, each token's own routing decision (Sec 3.5: the routed count varies); None in
        "topk", where the decision is the sequence's top-k. prior_BT: the scores of a router
        without weights of its own (A-MoD: the attention received in the previous block)."""
        if self.kind == "attention" and prior_BT is None and mode != "predictor":
            raise ValueError("routing.router='attention' scores tokens by the previous block's "
                             "attention: run it through the model's forward (MoDLM), which "
                             "passes those scores, or decode in mode 'predictor'")
        logits_BT = self.router(x_BTD, generator) if prior_BT is None else prior_BT.float()
        pred_BT = self.predictor(x_BTD) if self.predictor is not None else None
        mode = self.rule(mode)
        if mode == "router":
            mask_BT = logits_BT.detach() > self.router.causal_threshold(self.capacity)
        elif mode == "predictor":
            mask_BT = self.split_prediction(pred_BT)[0].detach() > 0.0  # predicted top-k
        else:
            mask_BT = None
        return logits_BT, pred_BT, mask_BT

    def decide_one(self, x_B1D: Tensor, mode: RoutingMode) -> tuple[Tensor, Tensor | None]:
        """A decode step's decision for one new token per row: (mask (B,), router logits (B, 1)
        in mode "router", None in mode "predictor", where the router need only score the rows
        that route). Only what the causal rule reads is computed (`causal_decision` also
        computes what training statistics need)."""
        if self.rule(mode) == "router":
            logits_B1 = self.router(x_B1D)
            return logits_B1[:, 0] > self.router.causal_threshold(self.capacity), logits_B1
        if mode == "predictor" and self.predictor is not None:
            return self.predictor(x_B1D)[:, 0] > 0.0, None
        raise ValueError(f"decoding needs a causal mode ('router', or 'predictor' with a "
                         f"predictor), got {mode!r}")

    def forward(self, x_BTD: Tensor, rotary: EncodePositions, mode: RoutingMode = "topk",
                generator: torch.Generator | None = None, pos_BT: Tensor | None = None,
                valid_BT: Tensor | None = None, prior_BT: Tensor | None = None
                ) -> tuple[Tensor, LayerRouting]:
        """The full-sequence routed update. rotary: positions -> the layer's position encoding;
        pos_BT: each token's position (default 0..T-1); valid_BT: the real tokens of a padded
        batch (padding is never routed; each row's top-k is over its real tokens); prior_BT:
        the attention received in the previous block (A-MoD's scores; `causal_decision`)."""
        B, T, _ = x_BTD.shape
        k = routing.capacity_k(T, self.capacity)
        logits_BT, pred_BT, mask_BT = self.causal_decision(x_BTD, mode, generator, prior_BT)
        pred_BT, pred_kv_BT = self.split_prediction(pred_BT)
        if valid_BT is None:
            topk_sel = routing.Selection.topk(logits_BT.detach(), k)   # Sec 3.4: per sequence
            topk_BT = topk_sel.mask(B, T)
        else:
            # Deviation: a padded row routes the top-k of its real tokens, k from its real length.
            topk_sel = None
            topk_BT = topk_mask_of_real_tokens(logits_BT.detach(), valid_BT, self.capacity)
        if self.rule(mode) == "topk":
            mask_BT = topk_BT
            sel = topk_sel or routing.Selection.from_mask(topk_BT)
        else:
            if valid_BT is not None:
                mask_BT = mask_BT & valid_BT           # padding is never routed
            sel = routing.Selection.from_mask(mask_BT)

        if pos_BT is None:
            pos_BT = torch.arange(T, device=x_BTD.device).expand(B, T)

        def compute(x_NKD: Tensor) -> tuple[Tensor, MoERouting | None]:
            pos_NK = sel.gather(pos_BT)                                   # true positions
            return self.update(x_NKD, rotary(pos_NK), pos_NK, sel.valid_NK,
                               drop_overflow=mode == "topk")

        kv_BT = topk_kv_BT = None
        if self.kv_capacity is None:
            out_BTD, moe = routing.routed_update(
                x_BTD, sel, self.router_weights(sel.gather(logits_BT)), compute)
        else:
            topk_kv_BT = self.topk_kv(logits_BT.detach(), valid_BT)
            kv_BT = (topk_kv_BT | mask_BT if mode == "topk"
                     else self.kv_mask(logits_BT, pred_kv_BT, mask_BT, mode, valid_BT))
            out_BTD, moe = decoupled_update(
                self.inner, x_BTD, sel, kv_BT, pos_BT, rotary,
                self.router_weights(sel.gather(logits_BT)), drop_overflow=mode == "topk",
                mlp=not self.attention_only)[:2]
        out_BTD, dense_moe = self.unrouted_mlp(out_BTD, valid_BT, drop_overflow=mode == "topk")
        stats = self._stats(k, logits_BT, pred_BT, topk_BT, mask_BT, valid_BT, moe or dense_moe)
        if kv_BT is not None:
            stats = self._with_kv_stats(stats, logits_BT, pred_kv_BT, kv_BT, topk_kv_BT, valid_BT)
        return out_BTD, stats

    def update(self, x_NKD: Tensor, pe: PositionEncoding, pos_NK: Tensor,
               valid_NK: Tensor | None, drop_overflow: bool) -> tuple[Tensor, MoERouting | None]:
        """f of the full-sequence forward on the gathered tokens (time order, true positions):
        the inner layer's causal update (its attention update alone when only attention is
        routed)."""
        return causal_update(self.inner, x_NKD, pe, valid_NK, drop_overflow,
                             mlp=not self.attention_only)[:2]

    # ---- keys and values routed apart from queries (routing.kv_capacity) -----------------------

    def split_prediction(self, pred_BT: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The predictor's logits of top-k membership and, in a layer that routes keys and
        values apart, of top-k_kv membership (None otherwise)."""
        if pred_BT is None or self.kv_capacity is None:
            return pred_BT, None
        return pred_BT[..., 0], pred_BT[..., 1]

    def topk_kv(self, scores_BT: Tensor, valid_BT: Tensor | None = None) -> Tensor:
        """Each row's top-k_kv by router score (among its real tokens): the key/value set of
        "topk" mode and the target of the key/value rules in the causal ones."""
        B, T = scores_BT.shape
        assert self.kv_capacity is not None
        if valid_BT is None:
            k_kv = routing.capacity_k(T, self.kv_capacity)
            return routing.Selection.topk(scores_BT, k_kv).mask(B, T)
        return topk_mask_of_real_tokens(scores_BT, valid_BT, self.kv_capacity)

    def kv_mask(self, logits_BT: Tensor | None, pred_kv_BT: Tensor | None, q_BT: Tensor,
                mode: RoutingMode, valid_BT: Tensor | None = None) -> Tensor:
        """Causal modes: each token's own key/value decision, or'ed with its query decision q_BT
        (so the queries lie within the keys and values). Mode "router": r + b_kv > 0 for the
        learned router, the (1 - kv_capacity) quantile of N(0, 1) for the random control; mode
        "predictor": the predictor's second logit > 0."""
        if mode == "router":
            kv_BT = self.kv_router_logits(logits_BT.detach()) > self.router.causal_threshold(
                self.kv_capacity)
        elif mode == "predictor" and pred_kv_BT is not None:
            kv_BT = pred_kv_BT.detach() > 0.0
        else:
            raise ValueError(f"a key/value decision needs a causal mode ('router', or "
                             f"'predictor' with a predictor), got {mode!r}")
        if valid_BT is not None:
            kv_BT = kv_BT & valid_BT                   # padding is never routed
        # Deviation: a query is always a key/value (it must see itself), whatever its rule says.
        return kv_BT | q_BT

    def kv_router_logits(self, logits_BT: Tensor) -> Tensor:
        """r + b_kv: the router logit the key/value rule thresholds (r for the random control)."""
        if self.kv_offset is None:
            return logits_BT
        return logits_BT + self.kv_offset.float()

    def decide_one_kv(self, x_B1D: Tensor, mode: RoutingMode
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
        """`decide_one` for a layer that routes keys and values apart: (query mask (B,),
        key/value mask (B,), router logits (B, 1) in mode "router", else None)."""
        pred_kv_B1 = None
        if mode == "predictor" and self.predictor is not None:
            q_B1, pred_kv_B1 = self.split_prediction(self.predictor(x_B1D))
            q_B, logits_B1 = q_B1[:, 0] > 0.0, None
        else:
            q_B, logits_B1 = self.decide_one(x_B1D, mode)
        return q_B, self.kv_mask(logits_B1, pred_kv_B1, q_B[:, None], mode)[:, 0], logits_B1

    def _with_kv_stats(self, stats: LayerRouting, logits_BT: Tensor, pred_kv_BT: Tensor | None,
                       kv_BT: Tensor, topk_kv_BT: Tensor, valid_BT: Tensor | None
                       ) -> LayerRouting:
        """The statistics with the key/value set and the key/value rules' losses added: a BCE
        against top-k_kv membership of r.detach() + b_kv (into the router's aux loss, so
        aux_loss_weight weights it; only b_kv learns from it) and of the predictor's second
        logit (into the predictor loss)."""
        target_BT = topk_kv_BT.float()
        aux, pred_loss = stats.router_aux_loss, stats.predictor_loss
        if self.kv_offset is not None and aux is not None:
            aux = aux + _masked_bce(self.kv_router_logits(logits_BT.detach()), target_BT,
                                    valid_BT)
        if pred_kv_BT is not None and pred_loss is not None:
            pred_loss = pred_loss + _masked_bce(pred_kv_BT, target_BT, valid_BT)
        return dataclasses.replace(stats, router_aux_loss=aux, predictor_loss=pred_loss,
                                   kv_mask_BT=kv_BT,
                                   kv_fraction=_masked_mean(kv_BT.float(), valid_BT))

    def unrouted_mlp(self, x_BTD: Tensor, valid_BT: Tensor | None = None,
                     drop_overflow: bool = True) -> tuple[Tensor, MoERouting | None]:
        """After the routed update: with `skip = "attention"` the MLP sublayer on every token
        (skipped tokens skip attention only); otherwise nothing."""
        if not self.attention_only:
            return x_BTD, None
        mlp_BTD, moe = self.inner.mlp_update(x_BTD, valid_BT, drop_overflow)
        return x_BTD + mlp_BTD, moe

    def _stats(self, k: int, logits_BT: Tensor, pred_BT: Tensor | None, topk_BT: Tensor,
               mask_BT: Tensor, valid_BT: Tensor | None, moe: MoERouting | None) -> LayerRouting:
        target_BT = topk_BT.float()
        aux = pred_loss = router_acc = pred_acc = None
        if self.thresholded:
            # Deviation: the threshold router's penalty, (routed share - capacity)^2. The share
            # is the realized one (a straight-through estimate: its value counts the routed
            # tokens, its gradient is that of the mean sigmoid(r)), so the penalty is zero
            # exactly when the block runs at its capacity.
            p_BT = torch.sigmoid(logits_BT)
            share = _masked_mean(mask_BT.float() + p_BT - p_BT.detach(), valid_BT)
            aux = (share - self.capacity) ** 2
            router_acc = _masked_mean((mask_BT == topk_BT).float(), valid_BT)
        if self.learned:
            # Sec 3.5 fix 1: BCE of the router logits against top-k membership.
            # Deviation: the paper does not say; the logits are not detached, so this loss's
            # gradient reaches the router and, through its input, the trunk (docs/design.md).
            aux = _masked_bce(logits_BT, target_BT, valid_BT)
            router_acc = _masked_mean(((logits_BT.detach() > 0) == topk_BT).float(), valid_BT)
        if pred_BT is not None:
            # Sec 3.5 fix 2: the predictor learns top-k membership from stop-gradient inputs.
            pred_loss = _masked_bce(pred_BT, target_BT, valid_BT)
            pred_acc = _masked_mean(((pred_BT.detach() > 0) == topk_BT).float(), valid_BT)
        return LayerRouting(
            layer=self.index, k=k, mask_BT=mask_BT,
            weights_BT=self.router_weights(logits_BT.detach()).detach(),
            fraction=_masked_mean(mask_BT.float(), valid_BT), router_aux_loss=aux,
            predictor_loss=pred_loss, router_accuracy=router_acc, predictor_accuracy=pred_acc,
            moe=moe)


class RoutedBlock(RoutedLayer):
    """A modlm `Block` that only processes the tokens its router selects (Eq. 1)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.block = Block(cfg, layer)

    @property
    def inner(self) -> Block:
        return self.block

    @property
    def layer(self) -> int:
        return self.index


_ROUTERS: dict[str, Callable[[int], nn.Module]] = {
    "learned": LinearRouter, "threshold": ThresholdRouter,
    "random": lambda d_model: RandomRouter(), "attention": lambda d_model: AttentionRouter()}


def topk_mask_of_real_tokens(scores_BT: Tensor, valid_BT: Tensor, capacity: float) -> Tensor:
    """Each row's top-k among its real tokens, k = capacity_k(real length): what the row would
    route alone, unpadded (ties aside)."""
    B, T = scores_BT.shape
    k_B = torch.tensor([routing.capacity_k(int(n), capacity) if n > 0 else 0
                        for n in valid_BT.sum(dim=1).tolist()], device=scores_BT.device)
    order_BT = torch.argsort(scores_BT.masked_fill(~valid_BT, -math.inf), dim=1,
                             descending=True, stable=True)
    rank_BT = torch.empty_like(order_BT).scatter_(
        1, order_BT, torch.arange(T, device=scores_BT.device).expand(B, T).contiguous())
    return (rank_BT < k_B[:, None]) & valid_BT


def _masked_mean(x_BT: Tensor, valid_BT: Tensor | None) -> Tensor:
    return x_BT.mean() if valid_BT is None else x_BT[valid_BT].mean()


def _masked_bce(logits_BT: Tensor, target_BT: Tensor, valid_BT: Tensor | None) -> Tensor:
    if valid_BT is None:
        return F.binary_cross_entropy_with_logits(logits_BT, target_BT)
    return F.binary_cross_entropy_with_logits(logits_BT[valid_BT], target_BT[valid_BT])
