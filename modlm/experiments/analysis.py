"""Routing analysis (paper Fig 1 and Fig 5): what the routers did, token by token.

Legend: B batch, T time, L routed blocks, V vocabulary, N tokens (flattened B x T).

Pure functions on `ModelOutput` / `LayerRouting` fields and plain tensors, so each is tested with
hand-made masks:

- `routing_mask`:             the (L, B, T) routing decisions of all routed blocks.
- `blocks_used`:              how many routed blocks each token went through (Fig 5's "depth").
- `prediction_entropy`:       the entropy (nats) of the model's next-token distribution.
- `pearson`, `spearman`:      correlation coefficients (Spearman with average ranks for ties).
- `entropy_by_blocks_used`:   mean entropy of the tokens that used 0, 1, ... blocks.
- `weight_histogram`:         router weights binned per routed block (Fig 5's histogram).

`collect_routing` runs a model over windows of text in one routing mode and gathers these
per-token quantities; `summarise` turns them into the numbers the routing experiment reports.
The paper's finding to check (Sec 4.1, Fig 5): tokens that use more blocks go with
higher-entropy predictions, and with the auxiliary loss about `capacity` of the router weights
sit above 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def routing_mask(routing: Sequence[Any]) -> Tensor:
    """Stack the routed blocks' masks: (L, B, T) bool, in block order. `routing` is
    `ModelOutput.routing` (anything with a `mask_BT` field)."""
    if not routing:
        raise ValueError("the model has no routed block: routing analysis needs a MoD model")
    return torch.stack([r.mask_BT.bool() for r in routing])


def blocks_used(routing: Sequence[Any]) -> Tensor:
    """(B, T) int64: the number of routed blocks each token went through."""
    return routing_mask(routing).long().sum(dim=0)


def prediction_entropy(logits_BTV: Tensor) -> Tensor:
    """(B, T) float32: entropy in nats of softmax(logits) at every position."""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return -(logp_BTV.exp() * logp_BTV).sum(dim=-1)


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson's r of two equally long 1-D samples; NaN when either is constant."""
    x, y = _pair(x, y)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / denom if denom > 0 else math.nan


def ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D sample, ties sharing their average rank (float64)."""
    x = x.double().flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    # Runs of equal values: each gets the mean of the positions it spans.
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    positions = torch.arange(1, n + 1, dtype=torch.float64)
    n_runs = int(run_id[-1]) + 1 if n else 0
    run_sum = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, run_id, positions)
    run_len = torch.zeros(n_runs, dtype=torch.float64).index_add_(
        0, run_id, torch.ones(n, dtype=torch.float64))
    out = torch.empty(n, dtype=torch.float64)
    out[order] = (run_sum / run_len)[run_id]
    return out


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rho (Pearson's r of the average ranks); NaN when either is constant."""
    x, y = _pair(x, y)
    return pearson(ranks(x), ranks(y))


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"samples differ in length: {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        raise ValueError(f"a correlation needs at least 2 points, got {x.numel()}")
    return x, y


@dataclass(frozen=True)
class EntropyBucket:
    blocks: int          # routed blocks used
    tokens: int          # how many tokens used that many
    mean_entropy: float  # their mean prediction entropy (nats)


def entropy_by_blocks_used(blocks: Tensor, entropy: Tensor, n_blocks: int) -> list[EntropyBucket]:
    """One bucket per possible count 0..n_blocks (empty buckets have mean NaN)."""
    blocks, entropy = blocks.flatten(), entropy.double().flatten()
    if blocks.numel() != entropy.numel():
        raise ValueError(f"blocks and entropy differ in size: {blocks.numel()} and "
                         f"{entropy.numel()}")
    out = []
    for c in range(n_blocks + 1):
        sel = blocks == c
        n = int(sel.sum())
        out.append(EntropyBucket(c, n, float(entropy[sel].mean()) if n else math.nan))
    return out


def weight_histogram(weights_LN: Tensor, bins: int = 40, lo: float = 0.0,
                     hi: float = 1.0) -> tuple[Tensor, Tensor]:
    """Counts (L, bins) of each routed block's router weights over [lo, hi] (values outside are
    clamped into the end bins) and the bin edges (bins + 1)."""
    if bins < 1 or not hi > lo:
        raise ValueError(f"need bins >= 1 and hi > lo, got bins={bins}, range=({lo}, {hi})")
    w = weights_LN.double().clamp(lo, hi)
    idx = ((w - lo) / (hi - lo) * bins).long().clamp_max(bins - 1)
    counts = torch.zeros(w.shape[0], bins, dtype=torch.long)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    return counts, torch.linspace(lo, hi, bins + 1, dtype=torch.float64)


# ---- running a model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingRecord:
    """Per-token routing of a model over some windows in one mode.

    mask_LBT: routing decisions; weights_LBT: router weights (sigmoid(r) by default);
    entropy_BT: prediction entropy at each position; ids_BT: the input tokens;
    layers: the routed blocks' indices.
    """

    mode: str
    layers: tuple[int, ...]
    ids_BT: Tensor
    mask_LBT: Tensor
    weights_LBT: Tensor
    entropy_BT: Tensor

    @property
    def blocks_used_BT(self) -> Tensor:
        return self.mask_LBT.long().sum(dim=0)


@torch.no_grad()
def collect_routing(model: torch.nn.Module, windows: Iterable[Tensor], mode: str) -> RoutingRecord:
    """Run `model` (a MoDLM) over (B, T) input windows in `mode` and keep every token's routing
    decisions, router weights and prediction entropy."""
    was_training = model.training
    model.eval()
    ids, masks, weights, ents = [], [], [], []
    layers: tuple[int, ...] = ()
    for x_BT in windows:
        out = model(x_BT, mode=mode)
        layers = tuple(r.layer for r in out.routing)
        ids.append(x_BT.cpu())
        masks.append(routing_mask(out.routing).cpu())
        weights.append(torch.stack([r.weights_BT.float() for r in out.routing]).cpu())
        ents.append(prediction_entropy(out.logits_BTV).cpu())
    model.train(was_training)
    if not ids:
        raise ValueError("no windows given to analyse")
    return RoutingRecord(mode, layers, torch.cat(ids), torch.cat(masks, dim=1),
                         torch.cat(weights, dim=1), torch.cat(ents))


def summarise(rec: RoutingRecord, bins: int = 40) -> dict[str, Any]:
    """The numbers the routing experiment reports, as plain Python values.

    Two entropies per token: of the prediction made *at* it (for the next token; "the entropy of
    the model's prediction at that token"), and of the prediction made at the previous position
    *of* it (how uncertain the model was about this token; positions after the first only).
    """
    used = rec.blocks_used_BT
    buckets = entropy_by_blocks_used(used, rec.entropy_BT, len(rec.layers))
    used_of, ent_of = used[:, 1:], rec.entropy_BT[:, :-1]
    w_LN = rec.weights_LBT.flatten(1)
    counts, edges = weight_histogram(w_LN, bins=bins)
    return {
        "mode": rec.mode,
        "layers": list(rec.layers),
        "tokens": int(used.numel()),
        "pearson_blocks_entropy": pearson(used, rec.entropy_BT),
        "spearman_blocks_entropy": spearman(used, rec.entropy_BT),
        "entropy_by_blocks_used": [vars(b) for b in buckets],
        "pearson_blocks_entropy_of_token": pearson(used_of, ent_of),
        "spearman_blocks_entropy_of_token": spearman(used_of, ent_of),
        "entropy_of_token_by_blocks_used": [
            vars(b) for b in entropy_by_blocks_used(used_of, ent_of, len(rec.layers))],
        "routed_fraction_per_layer": rec.mask_LBT.float().flatten(1).mean(1).tolist(),
        "weight_above_half_per_layer": (w_LN > 0.5).double().mean(1).tolist(),
        "weight_histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }
