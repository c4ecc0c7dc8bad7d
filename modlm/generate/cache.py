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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from modlm.block import DecoderLayer
from modlm.generate.errors import GenerationError
from modlm.layers import attend


class Rows(NamedTuple):
    """The live rows a layer writes in one decode step: their indices on the host (`host`) and on
    the device (`index`); `all` when every live row takes part (the dense case)."""

    host: np.ndarray
    index: Tensor
    all: bool

    @classmethod
    def every(cls, B: int, device: torch.device) -> Rows:
        return cls(np.arange(B), torch.arange(B, device=device), True)

    @classmethod
    def where(cls, mask_B: Tensor) -> Rows:
        """The rows whose entry of a boolean (B,) mask is set."""
        index = mask_B.nonzero().view(-1)
        return cls(_host_array(index), index, index.shape[0] == mask_B.shape[0])


class LayerCache:
    """Keys and values of one block, per row: slots [0, n_B[b]) of row b are its cached tokens.

    k_BHCd / v_BHCd: keys (already rotated) and values, H the key/value heads; pos_BC: each slot's
    true position; n_B: filled slots per row. A dense block fills one slot per token; a routed
    block one slot per token routed into it. `limit` is the most slots a row can ever need.

    The counts live on the host (`n_host`, a NumPy array): a decode step reads them to size its
    attention and pick slots without waiting on the device, and on a CPU `n_B` is a view of the
    same memory.
    """

    def __init__(self, k_BHCd: Tensor, v_BHCd: Tensor, pos_BC: Tensor, n_B: Tensor | np.ndarray,
                 limit: int, routed: bool) -> None:
        self.k_BHCd, self.v_BHCd, self.pos_BC = k_BHCd, v_BHCd, pos_BC
        self.n_host = np.array(_host_array(n_B), dtype=np.int64)
        self.limit = limit
        self.routed = routed

    @classmethod
    def empty(cls, B: int, H: int, Dh: int, slots: int, limit: int, routed: bool,
              dtype: torch.dtype, device: torch.device) -> LayerCache:
        return cls(torch.zeros(B, H, slots, Dh, dtype=dtype, device=device),
                   torch.zeros(B, H, slots, Dh, dtype=dtype, device=device),
                   torch.zeros(B, slots, dtype=torch.long, device=device),
                   np.zeros(B, dtype=np.int64), limit, routed)

    @property
    def n_B(self) -> Tensor:
        """Filled slots per row, on the cache's device."""
        return _on_device(self.n_host, self.k_BHCd.device)

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
        return int(self.n_host.sum())

    def fill(self, k_BKHd: Tensor, v_BKHd: Tensor, pos_BK: Tensor, n_B: Tensor) -> None:
        """Prefill: the first K slots of each row (entries past n_B[b] are padding)."""
        K = k_BKHd.shape[1]
        self.k_BHCd[:, :, :K] = k_BKHd.transpose(1, 2)
        self.v_BHCd[:, :, :K] = v_BKHd.transpose(1, 2)
        self.pos_BC[:, :K] = pos_BK
        self.n_host[:] = _host_array(n_B)

    def append(self, rows: Rows, k_NHd: Tensor, v_NHd: Tensor, pos_N: Tensor) -> np.ndarray:
        """Write one token for each given row (`rows.all`: every row) at its next free slot;
        return their new counts (host)."""
        n_N = self.n_host if rows.all else self.n_host[rows.host]
        lo, hi = _bounds(n_N)
        self.make_room(hi + 1)
        if rows.all and lo == hi:
            # Every row at the same slot (the common case): plain slice writes, no scatter.
            self.k_BHCd[:, :, lo] = k_NHd
            self.v_BHCd[:, :, lo] = v_NHd
            self.pos_BC[:, lo] = pos_N
            self.n_host += 1
            return self.n_host.copy()
        index = rows.index, _on_device(n_N, self.k_BHCd.device)
        self.k_BHCd[index[0], :, index[1]] = k_NHd
        self.v_BHCd[index[0], :, index[1]] = v_NHd
        self.pos_BC[index] = pos_N
        if rows.all:
            self.n_host += 1
            return self.n_host.copy()
        self.n_host[rows.host] += 1
        return n_N + 1

    def make_room(self, need: int) -> None:
        """At least `need` slots per row (growing by doubling, up to the limit)."""
        if need > self.slots:
            self._grow(need)

    def _grow(self, need: int) -> None:
        if need > self.limit:
            raise GenerationError(f"a row needs {need} cache slots but the cache was built for "
                                  f"{self.limit}; pass a larger max_tokens to prefill")
        slots = min(self.limit, max(need, 2 * self.slots))
        B, H, C, Dh = self.k_BHCd.shape
        k = self.k_BHCd.new_zeros(B, H, slots, Dh)
        v = self.v_BHCd.new_zeros(B, H, slots, Dh)
        pos = self.pos_BC.new_zeros(B, slots)
        k[:, :, :C], v[:, :, :C], pos[:, :C] = self.k_BHCd, self.v_BHCd, self.pos_BC
        self.k_BHCd, self.v_BHCd, self.pos_BC = k, v, pos

    def keep(self, rows: Tensor, rows_host: np.ndarray) -> None:
        """Keep only the given rows (in that order; on the device and on the host): finished
        rows leave the batch."""
        self.k_BHCd, self.v_BHCd = self.k_BHCd[rows], self.v_BHCd[rows]
        self.pos_BC = self.pos_BC[rows]
        self.n_host = self.n_host[rows_host]


@dataclass
class DecodeState:
    """Everything a decode step needs, for the live rows of a batch.

    rows: original (prompt) index of each live row. positions: tokens each live row has fed
    through the model so far (= the position the next token takes), on the host; `pos_B` is the
    same on the device. caches: one per block. max_tokens: the most tokens a row may feed
    (`Engine.prefill`; `capacity` is its old name, still readable and settable with a
    DeprecationWarning).
    routed_tokens / seen_tokens: per block, tokens routed into it and tokens that reached it,
    summed over prefill and decode and over all rows (including rows that have since left).
    retired_entries: per block, cache entries of rows that have left the batch.
    """

    rows: list[int]
    positions: np.ndarray
    caches: list[LayerCache]
    max_tokens: int
    routed_tokens: list[int]
    seen_tokens: list[int]
    retired_entries: list[int]

    @property
    def capacity(self) -> int:
        warnings.warn("DecodeState.capacity is now DecodeState.max_tokens", DeprecationWarning,
                      stacklevel=2)
        return self.max_tokens

    @capacity.setter
    def capacity(self, value: int) -> None:
        warnings.warn("DecodeState.capacity is now DecodeState.max_tokens", DeprecationWarning,
                      stacklevel=2)
        self.max_tokens = value

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def pos_B(self) -> Tensor:
        return _on_device(self.positions, self.caches[0].k_BHCd.device)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep the live rows at these indices (into `rows`), dropping the rest from every cache."""
        if list(keep) == list(range(len(self.rows))):
            return
        host = np.asarray(keep, dtype=np.int64)
        idx = _on_device(host, self.caches[0].k_BHCd.device)
        for i, cache in enumerate(self.caches):
            self.retired_entries[i] += cache.entries() - int(cache.n_host[host].sum())
            cache.keep(idx, host)
        self.positions = self.positions[host]
        self.rows = [self.rows[i] for i in keep]

    def cache_entries(self) -> list[int]:
        """Per block, tokens its cache holds, counting rows that have left at their final size."""
        return [c.entries() + r for c, r in zip(self.caches, self.retired_entries)]


# ---- building a cache and attending over it, shared by prefill and decode ----------------------


def _empty_cache(layer: DecoderLayer, B: int, slots: int, limit: int, routed: bool,
                 device: torch.device) -> LayerCache:
    return LayerCache.empty(B, layer.n_kv_heads, layer.head_dim, slots, limit, routed,
                            layer.kv_dtype, device)


def _host_array(x: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """An int64 / bool NumPy copy-free view of a CPU tensor (a copy from another device)."""
    if isinstance(x, Tensor):
        return (x if x.device.type == "cpu" else x.cpu()).numpy()
    return np.asarray(x)


def _on_device(x: np.ndarray, device: torch.device) -> Tensor:
    """A host array as a tensor on `device`: on a CPU a view of the same memory, no copy."""
    t = torch.from_numpy(x)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _bounds(n_N: np.ndarray) -> tuple[int, int]:
    """The smallest and largest of a few counts (as Python ints: NumPy's reductions cost more
    than the list for a batch's worth)."""
    values = n_N.tolist()
    return min(values), max(values)


def _length_mask(n_N: np.ndarray, device: torch.device) -> Tensor | None:
    """Attention mask (N, 1, 1, S) letting row r see its first n_N[r] slots; None if all equal."""
    lo, hi = _bounds(n_N)
    if lo == hi:
        return None
    return (torch.arange(hi, device=device) < _on_device(n_N, device)[:, None])[:, None, None, :]


def _attend_cached(layer: DecoderLayer, q_N1Hd: Tensor, cache: LayerCache, rows: Rows,
                   n_N: np.ndarray, mask: Tensor | None) -> Tensor:
    """One query per row over that row's cached slots; returns (N, H, 1, Dh)."""
    S = _bounds(n_N)[1]
    k, v = cache.k_BHCd[:, :, :S], cache.v_BHCd[:, :, :S]
    if not rows.all:
        k, v = k.index_select(0, rows.index), v.index_select(0, rows.index)
    return attend(q_N1Hd.transpose(1, 2), k, v, scale=layer.attn_scale, mask=mask)
