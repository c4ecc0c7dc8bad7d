"""Pure routing maths for Mixture-of-Depths (paper Sec 3.4): scores in, indices and tensors out.

Legend: B batch, T time (sequence), D model width, K routed tokens per sequence.

Everything here is a small function of tensors with no module state, so each step of the routed
block (score -> select -> gather -> compute -> weight -> scatter) can be tested by hand:

- `capacity_k`:             k from the capacity fraction and the batch's actual length.
- `topk_in_time_order`:     per-sequence top-k along time, indices sorted back into time order.
- `indices_from_mask`:      causal routing decisions (a varying count per row) to padded indices.
- `mask_from_indices`:      the boolean (B, T) routing mask from indices.
- `gather_tokens`:          pick the routed tokens' rows.
- `scatter_add_tokens`:     add their updates back; every other row stays bit-for-bit unchanged.
- `Selection` and `routed_update`: the routed update of Eq. 1 (gather, compute, weight,
  scatter), the one implementation every path calls: modlm's routed blocks, retrofitted
  Hugging Face layers, and the generation engine's prefill and decode steps.
- `slots_among` and `attention_mask_by_position`: for blocks whose keys and values come from a
  larger set than their queries (`routing.kv_capacity`), where each query sits in the key/value
  set and which keys it may see.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def capacity_k(seq_len: int, capacity: float) -> int:
    """Tokens per sequence a routed block processes: floor(capacity * T), at least 1.

    Paper Sec 3.4: capacity 12.5% of 2048 tokens is k = 256. The small epsilon keeps products such
    as 0.29 * 100 = 28.999999999999996 from losing a token to floating point.
    """
    if seq_len < 1:
        raise ValueError(f"sequence length must be >= 1, got {seq_len}")
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be in (0, 1], got {capacity}")
    # Deviation: the paper's k is capacity x S; at least 1, so a short sequence (or a tiny
    # capacity) still routes a token rather than skipping the block entirely (docs/design.md).
    return max(1, min(seq_len, math.floor(capacity * seq_len + 1e-9)))


def topk_in_time_order(scores_BT: Tensor, k: int) -> Tensor:
    """Indices (B, K) of each row's k largest scores, sorted by position.

    Paper Sec 3.4: top-k is taken per sequence, along time (never across the batch), and the
    selected tokens keep their original order so causal attention among them is by true position.
    """
    idx_BK = torch.topk(scores_BT, k, dim=1, sorted=False).indices
    return torch.sort(idx_BK, dim=1).values


def indices_from_mask(mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Padded indices of the routed tokens of each row, in time order, for causal routing.

    In the causal modes each token decides alone (sigmoid(r) > 0.5 or the predictor), so rows route
    different numbers of tokens. Returns idx_BK with K = the largest count in the batch and a
    validity mask valid_BK; row b's first n_b entries are its routed positions in increasing order,
    the rest are padding (positions of unrouted tokens, placed after every valid one so a causal
    mask over the K axis never lets a valid token attend to padding).
    """
    B, T = mask_BT.shape
    counts_B = mask_BT.sum(dim=1)
    K = int(counts_B.max()) if B > 0 else 0
    pos_T = torch.arange(T, device=mask_BT.device)
    # Routed positions sort first (key = position), unrouted after them (key = T + position).
    key_BT = torch.where(mask_BT, pos_T, pos_T + T)
    idx_BK = torch.sort(key_BT, dim=1).values[:, :K] % T
    valid_BK = torch.arange(K, device=mask_BT.device) < counts_B[:, None]
    return idx_BK, valid_BK


def mask_from_indices(idx_BK: Tensor, seq_len: int, valid_BK: Tensor | None = None) -> Tensor:
    """Boolean routing mask (B, T): True where a token goes through the block.

    The indices within a row must be distinct, as both `topk_in_time_order` and
    `indices_from_mask` guarantee (padding entries point at unrouted positions).
    """
    B = idx_BK.shape[0]
    mask_BT = torch.zeros(B, seq_len, dtype=torch.bool, device=idx_BK.device)
    src = torch.ones_like(idx_BK, dtype=torch.bool) if valid_BK is None else valid_BK
    return mask_BT.scatter(1, idx_BK, src)


def gather_tokens(x_BTD: Tensor, idx_BK: Tensor) -> Tensor:
    """The rows of x at the given positions: (B, T, D) x (B, K) -> (B, K, D)."""
    return torch.gather(x_BTD, 1, idx_BK.unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1]))


def scatter_add_tokens(x_BTD: Tensor, idx_BK: Tensor, update_BKD: Tensor,
                       valid_BK: Tensor | None = None) -> Tensor:
    """x with update added at the given positions; all other rows are returned bit-for-bit.

    With valid_BK (causal modes), padding entries are dropped rather than added as zeros, so even
    the sign of a -0.0 in an unrouted row survives. Out of place: autograd sees x + scatter.
    """
    B, T, D = x_BTD.shape
    if valid_BK is None:
        return x_BTD.scatter_add(1, idx_BK.unsqueeze(-1).expand(-1, -1, D), update_BKD)
    flat_idx = (idx_BK + T * torch.arange(B, device=idx_BK.device)[:, None])[valid_BK]
    out_ND = x_BTD.reshape(B * T, D).index_add(0, flat_idx, update_BKD[valid_BK])
    return out_ND.view(B, T, D)


# ---- the routed update of Eq. 1, for every path ------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The tokens a routed layer processes, as N rows of K positions each.

    idx_NK: each taking row's selected positions along time, in time order. valid_NK: False marks
    padding entries (causal decisions route varying counts per row; padding sits after every valid
    entry, at unrouted positions); None when every entry is valid. rows_N: which batch rows take
    part (None: all of them, N = B). A full-sequence forward selects positions within every row;
    a decode step (one new token per row, T = 1) selects the rows whose token routes, so a routed
    layer runs on exactly those rows.
    """

    idx_NK: Tensor
    valid_NK: Tensor | None = None
    rows_N: Tensor | None = None

    @classmethod
    def topk(cls, scores_BT: Tensor, k: int) -> Selection:
        """Each row's top-k by score (training, Sec 3.4)."""
        return cls(topk_in_time_order(scores_BT, k))

    @classmethod
    def from_mask(cls, mask_BT: Tensor) -> Selection:
        """Each row's routed tokens from per-token decisions (causal modes, Sec 3.5)."""
        return cls(*indices_from_mask(mask_BT))

    @classmethod
    def rows(cls, rows_N: Tensor, every: bool = False) -> Selection:
        """The given rows of a decode step, whose single new token routes: K = 1, no padding.
        every: they are all the batch's rows, in order (nothing to gather or scatter)."""
        return cls(rows_N.new_zeros(rows_N.numel(), 1), None, None if every else rows_N)

    @property
    def empty(self) -> bool:
        """Nothing to compute (in the causal modes a whole batch may route no token)."""
        return self.idx_NK.numel() == 0

    def gather(self, x_BT: Tensor) -> Tensor:
        """The selected entries of a (B, T) or (B, T, D) tensor: (N, K) or (N, K, D)."""
        if self.rows_N is not None:
            x_BT = x_BT.index_select(0, self.rows_N)
        if x_BT.shape[1] == 1 and self.idx_NK.shape[1] == 1:
            return x_BT                                    # one token per row: nothing to pick
        if x_BT.dim() == 2:
            return torch.gather(x_BT, 1, self.idx_NK)
        return gather_tokens(x_BT, self.idx_NK)

    def mask(self, batch: int, seq_len: int) -> Tensor:
        """The (B, T) boolean mask of the selected tokens."""
        mask_NT = mask_from_indices(self.idx_NK, seq_len, self.valid_NK)
        if self.rows_N is None:
            return mask_NT
        out = torch.zeros(batch, seq_len, dtype=torch.bool, device=mask_NT.device)
        out[self.rows_N] = mask_NT
        return out

    def scatter_add(self, x_BTD: Tensor, update_NKD: Tensor) -> Tensor:
        """x with the update added at the selected tokens; every other row stays bit for bit."""
        B, T, D = x_BTD.shape
        if T == 1 and self.valid_NK is None:          # one token per row (a decode step)
            if self.rows_N is None:
                return x_BTD + update_NKD
            return x_BTD.index_add(0, self.rows_N, update_NKD)
        if self.rows_N is None:
            return scatter_add_tokens(x_BTD, self.idx_NK, update_NKD, self.valid_NK)
        flat_NK = self.rows_N[:, None] * T + self.idx_NK
        if self.valid_NK is not None:
            flat, update = flat_NK[self.valid_NK], update_NKD[self.valid_NK]
        else:
            flat, update = flat_NK.reshape(-1), update_NKD.reshape(-1, D)
        return x_BTD.reshape(B * T, D).index_add(0, flat, update).view(B, T, D)


def routed_update(x_BTD: Tensor, sel: Selection, weights_NK: Tensor,
                  compute: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Any]:
    """Paper Sec 3.4, Eq. 1: x_i' = x_i + w_i * f_i(X~) for the selected tokens X~, x_i otherwise.

    `compute` maps the gathered tokens (N, K, D) to f of them and anything the caller wants back
    (an MoE layer's statistics; None). f runs on the selected tokens alone: nothing is computed
    for the others and then masked away. Returns the new x and what `compute` gave (None when
    nothing was selected).
    """
    if sel.empty:
        return x_BTD, None
    delta_NKD, extra = compute(sel.gather(x_BTD))
    update_NKD = (weights_NK.unsqueeze(-1) * delta_NKD).to(x_BTD.dtype)
    return sel.scatter_add(x_BTD, update_NKD), extra


# ---- queries and keys/values from different sets (routing.kv_capacity) -------------------------


def slots_among(mask_BT: Tensor) -> Tensor:
    """Each token's index among its row's selected tokens (B, T): its slot on the gathered axis
    of `Selection.from_mask(mask_BT)`, and in a KV cache filled from it. Meaningless (may be -1)
    at unselected tokens."""
    return mask_BT.long().cumsum(dim=1) - 1


def attention_mask_by_position(pos_q_NK: Tensor, valid_q_NK: Tensor | None, pos_kv_NS: Tensor,
                               valid_kv_NS: Tensor | None) -> Tensor:
    """Boolean attention mask (N, 1, K, S): query k sees key s iff s is a real entry at or before
    the query's true position (causal by position, across two different token sets).

    Padding queries see every key: their outputs are discarded, and a fully masked row would give
    NaN, whose gradient reaches the real entries through the softmax backward.
    """
    see_NKS = pos_kv_NS[:, None, :] <= pos_q_NK[:, :, None]
    if valid_kv_NS is not None:
        see_NKS = see_NKS & valid_kv_NS[:, None, :]
    if valid_q_NK is not None:
        see_NKS = see_NKS | ~valid_q_NK[:, :, None]
    return see_NKS[:, None]
