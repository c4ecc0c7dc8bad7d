"""Mixture-of-experts MLP with token-choice routing, a slot limit per expert and no-op
experts (paper Sec 4.3).

Legend: B groups (one per sequence), K tokens per group, D model width, F expert hidden width,
E real experts, N no-op experts, A = E + N router choices, S = top_k * K choice slots per group.

The MoE layer replaces a block's MLP. Three models of the paper's Sec 4.3 / Fig 7 are
configurations of this one layer (`MoEConfig`), not forks:

- MoE: E SwiGLU experts, a learned router choosing top-1 or top-2 per token (token choice, so
  each token decides from its own features: causal by construction), a limit on each expert's
  slots (Switch Transformer's capacity factor, `moe.capacity_factor`) with overflow passed
  through on the residual (its MLP update is zero), the Switch Transformer load-balancing loss
  and the ST-MoE router z-loss, router maths in float32.
- Integrated MoDE: the router's choices include N no-op experts; a token sent to one gets a zero
  MLP update (attention is unchanged), so about E / (E + N) of the MLP compute is spent.
- The paper's foil ("reduced capacity" MoE): plain MoE with a capacity factor below 1, so fewer
  slots per expert and overflow tokens dropped.
- Staged MoDE needs nothing here: an MoD-routed block (modlm/block.py) whose MLP is this layer.

Dispatch is sparse: choices are sorted by expert and each expert runs one matmul chain on exactly
the tokens sent to it. Slots are per sequence with time-order priority (all first choices of a
sequence before its second choices, GShard's rule), so whether a token overflows depends only on
earlier tokens of its own sequence: never on later tokens, never on other rows of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modlm.config import ModelConfig


def slots_per_expert(tokens: int, top_k: int, choices: int, factor: float | None) -> int:
    """Most choice slots one real expert takes per group: ceil(factor * tokens * top_k / choices).

    Switch Transformer's expert capacity (tokens per expert = capacity factor x tokens / experts;
    `moe.capacity_factor`), with every router choice, no-op experts included, in the denominator:
    a factor of 1 is one balanced share. None means no limit (every choice slot fits).
    """
    if factor is None:
        return tokens * top_k
    return max(1, math.ceil(factor * tokens * top_k / choices - 1e-9))


@dataclass(frozen=True)
class Dispatch:
    """Where every choice slot of every group goes (all tensors (B, S), slot order = priority).

    expert_BS: chosen expert (0..A-1; ids >= E are no-ops). gate_BS: its weight in the combined
    output. token_BS: the token (0..K-1) the slot belongs to. rank_BS: how many earlier slots of the
    group chose the same expert. keep_BS: the slot is computed (a real expert, within its
    slots_per_expert, and a valid token).
    """

    expert_BS: Tensor
    gate_BS: Tensor
    token_BS: Tensor
    rank_BS: Tensor
    keep_BS: Tensor


def route(logits_BKA: Tensor, top_k: int, n_real: int, slots_per_expert: int,
          valid_BK: Tensor | None = None) -> Dispatch:
    """Token-choice top-k routing with at most `slots_per_expert` slots per real expert and group,
    as pure tensor maths.

    Gates: the chosen experts' softmax probabilities, renormalised over the top_k choices when
    top_k > 1 (top-1 keeps the raw probability, as Switch does, so the router gets a gradient).
    Slots are ordered choice-rank-major then by time: slot j * K + t is token t's (j+1)-th choice.
    """
    B, K, A = logits_BKA.shape
    probs_BKA = torch.softmax(logits_BKA.float(), dim=-1)
    top_p_BKJ, top_i_BKJ = probs_BKA.topk(top_k, dim=-1)
    if top_k > 1:
        top_p_BKJ = top_p_BKJ / top_p_BKJ.sum(dim=-1, keepdim=True)
    expert_BS = top_i_BKJ.transpose(1, 2).reshape(B, top_k * K)
    gate_BS = top_p_BKJ.transpose(1, 2).reshape(B, top_k * K)
    token_BS = torch.arange(K, device=logits_BKA.device).repeat(top_k).expand(B, -1)
    valid_BS = (torch.ones_like(expert_BS, dtype=torch.bool) if valid_BK is None
                else valid_BK.repeat(1, top_k))
    onehot_BSA = F.one_hot(expert_BS, A) * valid_BS.unsqueeze(-1)
    rank_BS = (onehot_BSA.cumsum(dim=1) - onehot_BSA).gather(2, expert_BS.unsqueeze(-1))[..., 0]
    keep_BS = valid_BS & (expert_BS < n_real) & (rank_BS < slots_per_expert)
    return Dispatch(expert_BS, gate_BS, token_BS, rank_BS, keep_BS)


def load_balancing_loss(probs_NA: Tensor, first_choice_N: Tensor) -> Tensor:
    """Switch Transformer's auxiliary loss A * sum_a f_a * P_a over all router choices.

    f_a: share of tokens whose first choice is a; P_a: mean router probability of a. Equals 1 when
    both are uniform; no-op experts count as choices, so balancing also sets the no-op share.
    """
    A = probs_NA.shape[-1]
    f_A = F.one_hot(first_choice_N, A).float().mean(dim=0)
    return A * (f_A * probs_NA.float().mean(dim=0)).sum()


def router_z_loss(logits_NA: Tensor) -> Tensor:
    """ST-MoE's z-loss: mean of logsumexp(logits)^2, keeping router logits small."""
    return torch.logsumexp(logits_NA.float(), dim=-1).square().mean()


@dataclass(frozen=True)
class MoERouting:
    """What one MoE layer did (tensors detached except the two losses).

    load_A: share of valid choice slots sent to each choice (real experts first, then no-ops).
    computed / dropped / noop: shares of valid choice slots that a real expert computed, that
    overflowed a real expert's slots, and that chose a no-op (they sum to 1).
    expert_tokens_E: tokens each real expert computed.
    """

    layer: int
    slots_per_expert: int
    load_A: Tensor
    computed: Tensor
    dropped: Tensor
    noop: Tensor
    expert_tokens_E: Tensor
    balance_loss: Tensor
    z_loss: Tensor


class MoE(nn.Module):
    """E SwiGLU (or GELU) experts behind a float32 token-choice router, plus N no-op choices."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        m = cfg.moe
        self.layer = layer
        self.n_real, self.n_noop, self.top_k = m.experts, m.noop_experts, m.top_k
        self.slot_factor = m.capacity_factor     # `moe.capacity_factor` (Switch Transformer's name)
        self.kind = cfg.mlp
        D, F_ = cfg.d_model, cfg.expert_hidden
        n_in = 2 if cfg.mlp == "swiglu" else 1
        self.router = nn.Linear(D, m.experts + m.noop_experts, bias=False)
        # Expert weights stacked (E, out, in), each slice laid out like an nn.Linear weight.
        self.up = nn.Parameter(torch.empty(m.experts, n_in * F_, D))
        self.down = nn.Parameter(torch.empty(m.experts, D, F_))

    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        h = F.linear(x_ND, self.up[e])
        if self.kind == "swiglu":
            gate_NF, up_NF = h.chunk(2, dim=-1)
            return F.linear(F.silu(gate_NF) * up_NF, self.down[e])
        return F.linear(F.gelu(h), self.down[e])

    def forward(self, x_BKD: Tensor, valid_BK: Tensor | None = None,
                drop_overflow: bool = True) -> tuple[Tensor, MoERouting]:
        """The MLP update of every token (zero for no-op, overflow and invalid tokens).

        drop_overflow=False (the causal inference modes) computes every real-expert choice: no
        expert has a slot limit.
        """
        B, K, D = x_BKD.shape
        A = self.n_real + self.n_noop
        with torch.autocast(x_BKD.device.type, enabled=False):
            logits_BKA = F.linear(x_BKD.float(), self.router.weight.float())
        factor = self.slot_factor if drop_overflow else None
        per_expert = slots_per_expert(K, self.top_k, A, factor)
        d = route(logits_BKA, self.top_k, self.n_real, per_expert, valid_BK)

        # Sparse dispatch: kept slots sorted by expert; expert e computes its contiguous run only.
        keep_N = d.keep_BS.reshape(-1)
        expert_N = d.expert_BS.reshape(-1)[keep_N]
        row_N = (d.token_BS + K * torch.arange(B, device=x_BKD.device)[:, None]).reshape(-1)[keep_N]
        gate_N = d.gate_BS.reshape(-1)[keep_N]
        order_N = torch.argsort(expert_N, stable=True)
        expert_tokens_E = torch.bincount(expert_N, minlength=self.n_real)
        x_ND = x_BKD.reshape(B * K, D)
        out_ND = torch.zeros_like(x_ND)
        start = 0
        for e, n in enumerate(expert_tokens_E.tolist()):
            if n == 0:
                continue
            sel_N = order_N[start:start + n]
            start += n
            rows_N = row_N[sel_N]
            y_ND = self.expert(e, x_ND[rows_N]) * gate_N[sel_N, None].to(x_ND.dtype)
            out_ND = out_ND.index_add(0, rows_N, y_ND)

        valid_N = (torch.ones(B * K, dtype=torch.bool, device=x_BKD.device) if valid_BK is None
                   else valid_BK.reshape(-1))
        logits_NA = logits_BKA.reshape(B * K, A)[valid_N]
        probs_NA = torch.softmax(logits_NA, dim=-1)
        first_N = d.expert_BS[:, :K].reshape(-1)[valid_N]
        balance = load_balancing_loss(probs_NA, first_N)
        z = router_z_loss(logits_NA)
        valid_BS = (torch.ones_like(d.keep_BS) if valid_BK is None
                    else valid_BK.repeat(1, self.top_k))
        slots = valid_BS.sum().clamp(min=1).float()
        chosen_S = d.expert_BS[valid_BS]
        noop = (chosen_S >= self.n_real).sum() / slots
        computed = d.keep_BS.sum() / slots
        stats = MoERouting(
            layer=self.layer, slots_per_expert=per_expert,
            load_A=torch.bincount(chosen_S, minlength=A).float() / slots,
            computed=computed, dropped=1.0 - computed - noop, noop=noop,
            expert_tokens_E=expert_tokens_E, balance_loss=balance, z_loss=z)
        return out_ND.view(B, K, D), stats
