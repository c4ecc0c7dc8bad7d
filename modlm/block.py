"""The dense transformer block and the Mixture-of-Depths routed block (paper Sec 3.4, Eq. 1).

Legend: B batch, T time, K routed tokens per sequence, D model width.

Both blocks share one residual update f (pre-norm attention then MLP); the dense block adds it
to every token, the routed block only to the tokens its router selects:

    x_i' = x_i + w(r_i) * f_i(X~)   for the selected set X~,   x_i' = x_i otherwise,

with f computed on the gathered tokens alone (queries, keys and values from X~, rotary and causal
mask by original position). Nothing is computed for unselected tokens and then masked away.

A block's MLP may be a mixture of experts (modlm/moe.py); an MoD-routed block with an MoE MLP is
the paper's staged MoDE (Sec 4.3). Blocks return the MoE layer's statistics explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modlm import routing
from modlm.config import ModelConfig
from modlm.layers import MLP, Attention, RMSNorm, Rotary
from modlm.moe import MoE, MoERouting
from modlm.router import LinearRouter, Predictor, RandomRouter

RoutingMode = Literal["topk", "router", "predictor"]
ROUTING_MODES = ("topk", "router", "predictor")


class Block(nn.Module):
    """Pre-norm block. `update` is f of Eq. 1: the residual update, never the residual itself."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module = MoE(cfg, layer) if layer in cfg.moe_layers else MLP(cfg)

    def update(self, x_BKD: Tensor, rot: Tensor, valid_BK: Tensor | None = None,
               enforce_capacity: bool = True) -> tuple[Tensor, MoERouting | None]:
        """f(x) for the given tokens; `rot` is the rotary table at their true positions.

        valid_BK marks real tokens when rows are padded (an MoE MLP ignores the others);
        enforce_capacity applies an MoE MLP's expert capacity (training, `topk` mode).
        """
        return self.finish(x_BKD, self.attn(self.attn_norm(x_BKD), rot), valid_BK,
                           enforce_capacity)

    def finish(self, x_BKD: Tensor, attn_BKD: Tensor, valid_BK: Tensor | None = None,
               enforce_capacity: bool = True) -> tuple[Tensor, MoERouting | None]:
        """f(x) given the attention output: attn + mlp(norm(x + attn)). The generation engine,
        which attends over a KV cache itself, shares this half."""
        h_BKD = self.mlp_norm(x_BKD + attn_BKD)
        if isinstance(self.mlp, MoE):
            mlp_BKD, stats = self.mlp(h_BKD, valid_BK, enforce_capacity)
            return attn_BKD + mlp_BKD, stats
        return attn_BKD + self.mlp(h_BKD), None

    def forward(self, x_BTD: Tensor, rotary: Rotary,
                mode: RoutingMode = "topk") -> tuple[Tensor, MoERouting | None]:
        rot_TR = rotary(torch.arange(x_BTD.shape[1], device=x_BTD.device))
        delta_BTD, moe = self.update(x_BTD, rot_TR, enforce_capacity=mode == "topk")
        return x_BTD + delta_BTD, moe


@dataclass(frozen=True)
class LayerRouting:
    """What one routed block did, for losses, logging and analysis (all tensors detached
    except the two losses).

    mask_BT: True where the token went through the block. weights_BT: the router weight each
    token would receive (sigmoid(r), r or 1 per `router_weight`). fraction: routed share of tokens.
    predictor_accuracy / router_accuracy: agreement of the causal decisions (predictor logit > 0,
    sigmoid(r) > 0.5) with top-k membership; None where that part does not exist.
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


class RoutedBlock(nn.Module):
    """A block that only processes the tokens its router selects (Eq. 1)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.capacity = cfg.routing.capacity
        self.weighting = "constant" if cfg.routing.router == "random" else cfg.routing.router_weight
        self.block = Block(cfg, layer)
        self.router: nn.Module = (RandomRouter() if cfg.routing.router == "random"
                                  else LinearRouter(cfg.d_model))
        self.learned = cfg.routing.router == "learned"
        self.predictor = (Predictor(cfg.d_model, cfg.predictor_hidden)
                          if cfg.routing.predictor else None)

    def router_weights(self, logits_BT: Tensor) -> Tensor:
        # Deviation: sigmoid(r) by default, not Eq. 1's raw r; the paper's figures show weights
        # in [0, 1] with 0.5 as the decision line (docs/design.md).
        if self.weighting == "sigmoid":
            return torch.sigmoid(logits_BT)
        if self.weighting == "raw":
            return logits_BT  # Eq. 1 as written: x + r * f
        return torch.ones_like(logits_BT)

    def forward(self, x_BTD: Tensor, rotary: Rotary, mode: RoutingMode = "topk",
                generator: torch.Generator | None = None) -> tuple[Tensor, LayerRouting]:
        B, T, D = x_BTD.shape
        k = routing.capacity_k(T, self.capacity)
        logits_BT = self.router(x_BTD, generator)                         # float32
        pred_logits_BT = self.predictor(x_BTD) if self.predictor is not None else None
        topk_idx_BK = routing.topk_in_time_order(logits_BT.detach(), k)  # Sec 3.4: per sequence
        topk_BT = routing.mask_from_indices(topk_idx_BK, T)

        if mode == "topk":
            idx_BK, valid_BK, mask_BT = topk_idx_BK, None, topk_BT
        else:
            # Sec 3.5: at sampling time each token decides alone, so the routed count varies.
            if mode == "router":
                mask_BT = logits_BT.detach() > self.router.causal_threshold(self.capacity)
            else:
                mask_BT = pred_logits_BT.detach() > 0.0  # predicted top-k membership
            idx_BK, valid_BK = routing.indices_from_mask(mask_BT)

        out_BTD, moe = x_BTD, None
        if idx_BK.shape[1] > 0:  # in the causal modes a whole batch may route no token
            x_BKD = routing.gather_tokens(x_BTD, idx_BK)
            delta_BKD, moe = self.block.update(x_BKD, rotary(idx_BK),     # true positions
                                               valid_BK, enforce_capacity=mode == "topk")
            w_BK = self.router_weights(torch.gather(logits_BT, 1, idx_BK))
            # Paper Sec 3.4, Eq. 1: x_i' = x_i + r_i * f_i(X~) for selected tokens, x_i otherwise.
            out_BTD = routing.scatter_add_tokens(
                x_BTD, idx_BK, (w_BK.unsqueeze(-1) * delta_BKD).to(x_BTD.dtype), valid_BK)

        target_BT = topk_BT.float()
        aux = pred_loss = router_acc = pred_acc = None
        if self.learned:
            # Sec 3.5 fix 1: BCE of the router logits against top-k membership.
            aux = F.binary_cross_entropy_with_logits(logits_BT, target_BT)
            router_acc = ((logits_BT.detach() > 0) == topk_BT).float().mean()
        if pred_logits_BT is not None:
            # Sec 3.5 fix 2: the predictor learns top-k membership from stop-gradient inputs.
            pred_loss = F.binary_cross_entropy_with_logits(pred_logits_BT, target_BT)
            pred_acc = ((pred_logits_BT.detach() > 0) == topk_BT).float().mean()
        stats = LayerRouting(
            layer=self.layer, k=k, mask_BT=mask_BT,
            weights_BT=self.router_weights(logits_BT.detach()),
            fraction=mask_BT.float().mean(), router_aux_loss=aux, predictor_loss=pred_loss,
            router_accuracy=router_acc, predictor_accuracy=pred_acc, moe=moe)
        return out_BTD, stats
