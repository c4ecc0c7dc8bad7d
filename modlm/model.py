"""The decoder-only language model: embeddings, dense and routed blocks, LM head, named output.

Legend: B batch, T time, D model width, V vocabulary.

One code path for dense and MoD models: a dense model is one whose config routes no block.
`forward` returns a `ModelOutput` with the logits, the LM loss, the two auxiliary losses of
paper Sec 3.5 (kept separate and weighted into `loss`), one `LayerRouting` per routed block, and
for mixture-of-experts models (MoE, staged and integrated MoDE, Sec 4.3) one `MoERouting` per MoE
layer with its load-balancing and z-losses.

Routing modes for a full-sequence forward:
- "topk" (training, the paper's forward): exact top-k per sequence. NOT causal: whether token t is
  routed depends on the router scores of later tokens, so logits at t can change when the future
  changes (a test demonstrates it). Use it for training and for the paper's top-k evaluation only.
- "router": causal; token routed iff sigmoid(r) > 0.5 (trained by the auxiliary BCE loss).
- "predictor": causal; token routed iff the stop-gradient predictor says it is in the top-k.
MoE layers route token by token (causal in every mode); their expert capacity applies in "topk"
(the training forward) and not in the causal modes, which is what a sampler computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modlm.block import ROUTING_MODES, Block, LayerRouting, RoutedBlock, RoutingMode
from modlm.config import ModelConfig
from modlm.layers import RMSNorm, Rotary
from modlm.moe import MoERouting
from modlm.router import AttentionRouter, LinearRouter, ThresholdRouter


@dataclass(frozen=True)
class ModelOutput:
    """logits_BTV always; the losses when targets were given (None otherwise)."""

    logits_BTV: Tensor
    loss: Tensor | None              # lm_loss + weighted auxiliary losses: what training minimises
    lm_loss: Tensor | None
    router_aux_loss: Tensor | None   # mean over routed layers of the router BCE (Sec 3.5, fix 1)
    predictor_loss: Tensor | None    # mean over routed layers of the predictor BCE (fix 2)
    routing: tuple[LayerRouting, ...]
    moe: tuple[MoERouting, ...] = ()   # one per MoE layer, in block order
    moe_balance_loss: Tensor | None = None  # mean over MoE layers of the load-balancing loss
    moe_z_loss: Tensor | None = None        # mean over MoE layers of the router z-loss


class MoDLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        routed = set(cfg.routed_layers)
        self.blocks = nn.ModuleList(
            RoutedBlock(cfg, i) if i in routed else Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, init_std), residual output projections scaled by 1/sqrt(2 n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("kv_offset"):      # b_kv of the key/value rule starts at 0
                nn.init.zeros_(p)
            elif name.endswith(("attn.out.weight", "mlp.down.weight", "mlp.down")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                # MoE routers included: N(0, init_std) keeps their logits small, so every choice
                # starts near uniform (Switch Transformer's scaled-down router init).
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, LinearRouter):  # Deviation: the paper gives no router init.
                # Distinct scores from the first step (all-zero weights would tie every token and
                # make the first top-k arbitrary); sigmoid(r) still starts near 0.5.
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(self.cfg.d_model))
            if isinstance(m, ThresholdRouter):
                nn.init.zeros_(m.bias)       # the threshold starts at sigmoid(r) = 0.5

    def forward(self, idx_BT: Tensor, targets_BT: Tensor | None = None,
                mode: RoutingMode = "topk",
                generator: torch.Generator | None = None) -> ModelOutput:
        """Logits (and losses, given targets; target -1 is ignored) for token ids idx_BT."""
        check_token_inputs(self.cfg, idx_BT, targets_BT, mode)
        x_BTD = self.embed(idx_BT)
        stats: list[LayerRouting] = []
        moe: list[MoERouting] = []
        # A-MoD: the block before each routed block also gives the attention each token received.
        scored = set(self.cfg.routed_layers) if self.cfg.routing.router == "attention" else set()
        received_BT = None
        for i, block in enumerate(self.blocks):
            if isinstance(block, RoutedBlock):
                x_BTD, layer_stats = block(x_BTD, self.rotary, mode, generator,
                                           prior_BT=received_BT)
                stats.append(layer_stats)
                layer_moe = layer_stats.moe
            elif i + 1 in scored:
                x_BTD, layer_moe, received_BT = block(x_BTD, self.rotary, mode, received=True)
            else:
                x_BTD, layer_moe = block(x_BTD, self.rotary, mode)
            if layer_moe is not None:
                moe.append(layer_moe)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        return assemble_output(self.cfg, logits_BTV, targets_BT, tuple(stats), tuple(moe))

    # ---- what the generation engine drives (modlm.generate.Backbone) ---------------------------

    @property
    def context_length(self) -> int:
        return self.cfg.max_seq_len

    def embed_tokens(self, idx_BT: Tensor, pos_BT: Tensor) -> Tensor:
        return self.embed(idx_BT)           # positions enter through the rotary table

    def encode_positions(self, pos: Tensor) -> Tensor:
        return self.rotary(pos)

    def decoder_layers(self) -> list[Block | RoutedBlock]:
        return list(self.blocks)

    def head(self, x_BTD: Tensor) -> Tensor:
        return self.lm_head(self.norm(x_BTD))

    def num_parameters(self) -> int:
        """Trainable parameters, counting tied embeddings once."""
        return sum(p.numel() for p in self.parameters())


def assemble_output(cfg: ModelConfig, logits_BTV: Tensor, targets_BT: Tensor | None,
                    routing: tuple[LayerRouting, ...],
                    moe: tuple[MoERouting, ...] = ()) -> ModelOutput:
    """The named output from logits and per-layer statistics: the LM loss (target -1 ignored)
    and the weighted auxiliary losses (paper Sec 3.5; MoE balance and z-losses). Shared by
    `MoDLM` and the retrofitted Hugging Face models (modlm.hf.retrofit)."""
    if targets_BT is None:
        return ModelOutput(logits_BTV, None, None, None, None, routing, moe)
    aux = _mean([s.router_aux_loss for s in routing])
    pred = _mean([s.predictor_loss for s in routing])
    balance = _mean([m.balance_loss for m in moe])
    z = _mean([m.z_loss for m in moe])
    lm_loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten().long(),
                              ignore_index=-1)
    loss = lm_loss
    for value, weight in ((aux, cfg.routing.aux_loss_weight),
                          (pred, cfg.routing.predictor_loss_weight),
                          (balance, cfg.moe.balance_loss_weight), (z, cfg.moe.z_loss_weight)):
        if value is not None and weight > 0:
            loss = loss + weight * value
    return ModelOutput(logits_BTV, loss, lm_loss, aux, pred, routing, moe, balance, z)


def check_token_inputs(cfg: ModelConfig, idx_BT: Tensor, targets_BT: Tensor | None, mode: str,
                       n_ids: int | None = None) -> None:
    """Clear errors for a bad forward call: routing mode, shape, dtype, length, id ranges.

    n_ids: how many token ids the embedding takes (default cfg.vocab_size). Shared by `MoDLM`
    and the retrofitted Hugging Face models (modlm.hf.retrofit), which have the same contract.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode must be one of {ROUTING_MODES}, got {mode!r}")
    if mode == "predictor" and not cfg.is_dense and not cfg.routing.predictor:
        raise ValueError("routing mode 'predictor' needs a model built with "
                         "routing.predictor=true; use mode='router' or 'topk'")
    if mode == "router" and not cfg.is_dense and cfg.routing.router == "attention":
        raise ValueError(AttentionRouter.NO_ROUTER_RULE)
    if idx_BT.dim() != 2:
        raise ValueError(f"expected token ids of shape (batch, time), "
                         f"got {tuple(idx_BT.shape)}")
    if idx_BT.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be int64 or int32, got {idx_BT.dtype}")
    T = idx_BT.shape[1]
    if not 1 <= T <= cfg.max_seq_len:
        raise ValueError(f"sequence length {T} must be in "
                         f"1..max_seq_len={cfg.max_seq_len}")
    if torch.compiler.is_compiling():
        return  # the value checks below read tensors and would break the compiled graph
    V = cfg.vocab_size if n_ids is None else n_ids
    lo, hi = int(idx_BT.min()), int(idx_BT.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token ids must be in 0..{V - 1} (vocab_size), "
                         f"got values in {lo}..{hi}; check the tokenizer matches the model")
    if targets_BT is not None:
        if targets_BT.shape != idx_BT.shape:
            raise ValueError(f"targets shape {tuple(targets_BT.shape)} must equal the inputs' "
                             f"{tuple(idx_BT.shape)}")
        lo, hi = int(targets_BT.min()), int(targets_BT.max())
        if lo < -1 or hi >= V:
            raise ValueError(f"targets must be -1 (ignored) or in 0..{V - 1}, "
                             f"got values in {lo}..{hi}")


def _mean(losses: list[Tensor | None]) -> Tensor | None:
    present = [l for l in losses if l is not None]
    return torch.stack(present).mean() if present else None
