"""Held-out evaluation in every routing mode: loss, bits per byte, and what the routers did.

`topk` is the training forward (not causal, paper Sec 3.5); `router` and `predictor` are the
causal modes a sampler can use, so their numbers are the honest ones. Each mode reports the mean
next-token loss (nats), bits per byte, and per routed block the fraction of tokens routed and the
router's and predictor's agreement with top-k membership (paper Fig 6).

Bits per byte = loss / ln 2 / (UTF-8 bytes per token of the split). For a byte tokenizer that is
loss / ln 2 exactly; for BPE the split's average bytes per token is used, which is exact when the
whole split is evaluated and an estimate when only `max_batches` of it are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from modlm.config import ModelConfig
from modlm.corpus import DataError
from modlm.data import eval_batches, split_windows
from modlm.model import MoDLM
from modlm.runtime import Dist, all_reduce, autocast


def available_modes(cfg: ModelConfig) -> tuple[str, ...]:
    """Routing modes worth evaluating: a dense model has one; MoD models have their causal ones.

    An MoE model without MoD routing also gets "router": the inference forward, in which experts
    have no capacity limit (modlm/moe.py), as opposed to the training forward's capacity.
    """
    if cfg.is_dense:
        return ("topk", "router") if cfg.moe_layers and cfg.moe.capacity_factor else ("topk",)
    # A threshold router routes by its threshold in "topk" too; A-MoD has no router rule.
    modes = ["topk"] if cfg.routing.router == "attention" else ["topk", "router"]
    if cfg.routing.predictor:
        modes.append("predictor")
    return tuple(modes)


@dataclass(frozen=True)
class LayerSummary:
    layer: int
    fraction_routed: float
    router_accuracy: float | None
    predictor_accuracy: float | None


@dataclass(frozen=True)
class MoESummary:
    """An MoE layer's shares of choice slots: computed by an expert, dropped, sent to a no-op."""

    layer: int
    computed: float
    dropped: float
    noop: float


@dataclass(frozen=True)
class ModeResult:
    mode: str
    loss: float
    bits_per_byte: float
    tokens: int
    layers: tuple[LayerSummary, ...]
    moe: tuple[MoESummary, ...] = ()

    def as_dict(self) -> dict:
        return {"loss": self.loss, "bpb": self.bits_per_byte, "tokens": self.tokens,
                "layers": [vars(l) for l in self.layers],
                **({"moe": [vars(m) for m in self.moe]} if self.moe else {})}


@torch.no_grad()
def evaluate(model: MoDLM, ids: np.ndarray, *, n_bytes: int, seq_len: int, batch_size: int,
             max_batches: int | None, modes: tuple[str, ...] | None = None,
             device: torch.device | None = None, dtype: str = "float32",
             d: Dist | None = None) -> dict[str, ModeResult]:
    """Evaluate `model` on the sequential windows of `ids` in each mode (all ranks take part)."""
    cfg = model.cfg
    device = device or torch.device("cpu")
    d = d or Dist()
    modes = modes or available_modes(cfg)
    was_training = model.training
    model.eval()
    n_routed = len(cfg.routed_layers)
    n_moe = len(cfg.moe_layers)
    results = {}
    for mode in modes:
        # sums: nll, tokens, per routed layer: routed, router correct, predictor correct; then
        # per MoE layer: computed, dropped and no-op shares (token-weighted)
        sums = torch.zeros(2 + 3 * n_routed + 3 * n_moe, dtype=torch.float64)
        for windows in eval_batches(ids, batch_size=batch_size, seq_len=seq_len,
                                    max_batches=max_batches, rank=d.rank,
                                    world_size=d.world_size):
            empty = windows.shape[0] == 0  # this rank's share of the last global batch
            if empty and not d.enabled:
                continue
            if empty:
                # A sharded (FSDP) model gathers weights inside forward, so every rank must run
                # it as often as the others: run a throwaway row and count nothing.
                windows = torch.zeros(1, seq_len + 1, dtype=torch.long)
            windows = windows.to(device)
            x_BT, y_BT = split_windows(windows)
            with autocast(device, dtype):
                out = model(x_BT, mode=mode)
            if empty:
                continue
            nll = F.cross_entropy(out.logits_BTV.float().flatten(0, 1), y_BT.flatten(),
                                  reduction="sum")
            n = y_BT.numel()
            sums[0] += float(nll)
            sums[1] += n
            for j, s in enumerate(out.routing):
                sums[2 + 3 * j] += float(s.mask_BT.sum())
                if s.router_accuracy is not None:
                    sums[3 + 3 * j] += float(s.router_accuracy) * n
                if s.predictor_accuracy is not None:
                    sums[4 + 3 * j] += float(s.predictor_accuracy) * n
            for m in out.moe:  # a routed block that routed no token has no MoE entry
                base = 2 + 3 * n_routed + 3 * cfg.moe_layers.index(m.layer)
                sums[base:base + 3] += torch.tensor(
                    [float(m.computed), float(m.dropped), float(m.noop)], dtype=torch.float64) * n
        sums = all_reduce(sums, d)
        tokens = int(sums[1])
        if tokens == 0:
            raise DataError(f"evaluation saw no tokens: the split has {len(ids)} tokens, fewer "
                            f"than one window of {seq_len + 1}; use more text or a shorter seq_len")
        loss = float(sums[0]) / tokens
        bytes_per_token = n_bytes / max(1, len(ids))
        layers = tuple(
            LayerSummary(
                layer=layer,
                fraction_routed=float(sums[2 + 3 * j]) / tokens,
                router_accuracy=(float(sums[3 + 3 * j]) / tokens
                                 if cfg.routing.router in ("learned", "threshold") else None),
                predictor_accuracy=(float(sums[4 + 3 * j]) / tokens
                                    if cfg.routing.predictor else None))
            for j, layer in enumerate(cfg.routed_layers))
        moe = tuple(MoESummary(layer, *(float(v) / tokens for v in
                                        sums[2 + 3 * n_routed + 3 * j:][:3]))
                    for j, layer in enumerate(cfg.moe_layers))
        results[mode] = ModeResult(mode, loss, loss / math.log(2) / bytes_per_token, tokens,
                                   layers, moe)
    model.train(was_training)
    return results
