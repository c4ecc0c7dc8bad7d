"""The KV cache of generation: a `LayerCache` per block, the `DecodeState` that carries the
caches and counters of the live rows from one decode step to the next, and attention of new
queries over a cache.

Legend: B batch (live rows), K tokens written at once, H heads, Dh head width, C cache slots,
N rows processed by a routed layer in one decode step, S slots attended over.

A dense block's cache holds every token of each row; a routed block's holds only the tokens
routed into it, per row (`n_B` differs across rows), keys rotated at their true positions, slots
padded and masked out in attention. A cache grows by doubling up to its `limit`, so a routed
cache's memory follows the routing. Finished rows leave the batch: `DecodeState.keep` drops their
cache rows and counts what they held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from modlm.block import DecoderLayer
from modlm.generate.errors import GenerationError
from modlm.layers import attend


class LayerCache:
    """Keys and values of one block, per row: slots [0, n_B[b]) of row b are its cached tokens.

    k_BHCd / v_BHCd: keys (already rotated) and values, H the key/value heads; pos_BC: each slot's
    true position; n_B: filled slots per row. A dense block fills one slot per token; a routed
    block one slot per token routed into it. `limit` is the most slots a row can ever need.
    """

    def __init__(self, k_BHCd: Tensor, v_BHCd: Tensor, pos_BC: Tensor, n_B: Tensor,
                 limit: int, routed: bool) -> None:
        self.k_BHCd, self.v_BHCd, self.pos_BC, self.n_B = k_BHCd, v_BHCd, pos_BC, n_B
        self.limit = limit
        self.routed = routed

    @classmethod
    def empty(cls, B: int, H: int, Dh: int, slots: int, limit: int, routed: bool,
              dtype: torch.dtype, device: torch.device) -> LayerCache:
        return cls(torch.zeros(B, H, slots, Dh, dtype=dtype, device=device),
                   torch.zeros(B, H, slots, Dh, dtype=dtype, device=device),
                   torch.zeros(B, slots, dtype=torch.long, device=device),
                   torch.zeros(B, dtype=torch.long, device=device), limit, routed)

    @property
    def slots(self) -> int:
        return self.k_BHCd.shape[2]

    @property
    def entry_bytes(self) -> int:
        """Bytes one cached token takes (its keys and values over all key/value heads)."""
        _, G, _, Dh = self.k_BHCd.shape
        return 2 * G * Dh * self.k_BHCd.element_size()

    def entries(self) -> int:
        """Tokens held, summed over rows."""
        return int(self.n_B.sum())

    def fill(self, k_BKHd: Tensor, v_BKHd: Tensor, pos_BK: Tensor, n_B: Tensor) -> None:
        """Prefill: the first K slots of each row (entries past n_B[b] are padding)."""
        K = k_BKHd.shape[1]
        self.k_BHCd[:, :, :K] = k_BKHd.transpose(1, 2)
        self.v_BHCd[:, :, :K] = v_BKHd.transpose(1, 2)
        self.pos_BC[:, :K] = pos_BK
        self.n_B.copy_(n_B)

    def append(self, rows_N: Tensor | None, k_NHd: Tensor, v_NHd: Tensor,
               pos_N: Tensor) -> Tensor:
        """Write one token for each given row (None: every row) at its next free slot; return
        their new counts."""
        n_N = self.n_B if rows_N is None else self.n_B[rows_N]
        lo, hi = (int(n) for n in torch.aminmax(n_N))
        if hi + 1 > self.slots:
            self._grow(hi + 1)
        if rows_N is None and lo == hi:
            # Every row at the same slot (the common case): plain slice writes, no scatter.
            self.k_BHCd[:, :, lo] = k_NHd
            self.v_BHCd[:, :, lo] = v_NHd
            self.pos_BC[:, lo] = pos_N
            self.n_B += 1
            return self.n_B
        rows = torch.arange(n_N.shape[0], device=n_N.device) if rows_N is None else rows_N
        self.k_BHCd[rows, :, n_N] = k_NHd
        self.v_BHCd[rows, :, n_N] = v_NHd
        self.pos_BC[rows, n_N] = pos_N
        n_N = n_N + 1
        self.n_B[rows] = n_N
        return n_N

    def _grow(self, need: int) -> None:
        if need > self.limit:
            raise GenerationError(f"a row needs {need} cache slots but the cache was built for "
                                  f"{self.limit}; pass a larger capacity to prefill")
        slots = min(self.limit, max(need, 2 * self.slots))
        B, H, C, Dh = self.k_BHCd.shape
        k = self.k_BHCd.new_zeros(B, H, slots, Dh)
        v = self.v_BHCd.new_zeros(B, H, slots, Dh)
        pos = self.pos_BC.new_zeros(B, slots)
        k[:, :, :C], v[:, :, :C], pos[:, :C] = self.k_BHCd, self.v_BHCd, self.pos_BC
        self.k_BHCd, self.v_BHCd, self.pos_BC = k, v, pos

    def keep(self, rows: Tensor) -> None:
        """Keep only the given rows (in that order): finished rows leave the batch."""
        self.k_BHCd, self.v_BHCd = self.k_BHCd[rows], self.v_BHCd[rows]
        self.pos_BC, self.n_B = self.pos_BC[rows], self.n_B[rows]


@dataclass
class DecodeState:
    """Everything a decode step needs, for the live rows of a batch.

    rows: original (prompt) index of each live row. pos_B: tokens each live row has fed through
    the model so far (= the position the next token takes). caches: one per block.
    routed_tokens / seen_tokens: per block, tokens routed into it and tokens that reached it,
    summed over prefill and decode and over all rows (including rows that have since left).
    retired_entries: per block, cache entries of rows that have left the batch.
    """

    rows: list[int]
    pos_B: Tensor
    caches: list[LayerCache]
    capacity: int
    routed_tokens: list[int]
    seen_tokens: list[int]
    retired_entries: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep the live rows at these indices (into `rows`), dropping the rest from every cache."""
        if list(keep) == list(range(len(self.rows))):
            return
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.pos_B.device)
        for i, cache in enumerate(self.caches):
            self.retired_entries[i] += cache.entries() - int(cache.n_B[idx].sum())
            cache.keep(idx)
        self.pos_B = self.pos_B[idx]
        self.rows = [self.rows[i] for i in keep]

    def cache_entries(self) -> list[int]:
        """Per block, tokens its cache holds, counting rows that have left at their final size."""
        return [c.entries() + r for c, r in zip(self.caches, self.retired_entries)]


# ---- building a cache and attending over it, shared by prefill and decode ----------------------


def _empty_cache(layer: DecoderLayer, B: int, slots: int, limit: int, routed: bool,
                 device: torch.device) -> LayerCache:
    return LayerCache.empty(B, layer.n_kv_heads, layer.head_dim, slots, limit, routed,
                            layer.kv_dtype, device)


def _length_mask(n_N: Tensor) -> Tensor | None:
    """Attention mask (N, 1, 1, S) letting row r see its first n_N[r] slots; None if all equal."""
    lo, hi = torch.aminmax(n_N)
    lo, hi = int(lo), int(hi)
    if lo == hi:
        return None
    return (torch.arange(hi, device=n_N.device) < n_N[:, None])[:, None, None, :]


def _attend_cached(layer: DecoderLayer, q_N1Hd: Tensor, cache: LayerCache,
                   rows_N: Tensor | None, n_N: Tensor, mask: Tensor | None) -> Tensor:
    """One query per row over that row's cached slots; returns (N, H, 1, Dh)."""
    S = int(n_N.max()) if mask is None else mask.shape[-1]
    k, v = cache.k_BHCd[:, :, :S], cache.v_BHCd[:, :, :S]
    if rows_N is not None:
        k, v = k[rows_N], v[rows_N]
    return attend(q_N1Hd.transpose(1, 2), k, v, scale=layer.attn_scale, mask=mask)
