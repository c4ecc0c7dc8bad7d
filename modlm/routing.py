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
"""

from __future__ import annotations

import math

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
