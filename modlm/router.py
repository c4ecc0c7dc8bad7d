"""Routers (who goes through a block) and the causal predictor (paper Sec 3.4 and 3.5).

Legend: B batch, T time, D model width, P predictor hidden width.

- `LinearRouter`: r_i = w^T x_i, one vector per routed block (Sec 3.4), computed in float32.
- `RandomRouter`: Gaussian scores, the stochastic-routing control of Sec 4.1.
- `ThresholdRouter`: r_i = w^T x_i + b; every token with sigmoid(r_i) > 0.5 is routed, so the
  decision is causal in training as in sampling (a router beyond the paper's).
- `AttentionRouter` and `attention_received`: A-MoD (Gadhikar et al. 2024, arXiv:2412.20875),
  no weights; a token's score is the attention it received in the previous block.
- `Predictor`: a small MLP that sees the router's input through a stop-gradient and predicts
  whether a token is in the top-k (Sec 3.5, fix 2); its loss reaches no other parameter.

These are the modules with weights (or a random stream) that produce scores; what is done with
the scores (k from the capacity, top-k in time order, gather, scatter, the routed update) is
pure maths in routing.py.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def float32_only(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off, so the ops inside run in the dtype they are given (a no-op, and
    cheaper than entering an autocast context, when autocast is not on)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class LinearRouter(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_model))

    def causal_threshold(self, capacity: float) -> float:
        """Logit above which a token is routed causally: sigmoid(r) > 0.5 (Sec 3.5, fix 1)."""
        return 0.0

    def forward(self, x_BTD: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # Router logits and everything decided from them stay in float32, even under autocast.
        with float32_only(x_BTD.device.type):
            # A linear layer of one output rather than a matrix-vector product: the same maths,
            # one kernel, and one that FLOP counters see (FlopCounterMode ignores mv), so the
            # FLOP module can be checked.
            return F.linear(x_BTD.float(), self.weight.float()[None]).squeeze(-1)


class RandomRouter(nn.Module):
    """Scores drawn from N(0, 1) per token (Sec 4.1's "stochastic routing" control)."""

    def causal_threshold(self, capacity: float) -> float:
        """The (1 - capacity) quantile of N(0, 1): a token is routed with probability capacity.

        Deviation: the paper defines the control by top-k only; for causal evaluation we route
        each token independently at the same expected rate.
        """
        return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - capacity)))

    def forward(self, x_BTD: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        return torch.randn(B, T, generator=generator, device=x_BTD.device, dtype=torch.float32)


class ThresholdRouter(LinearRouter):
    """r = w^T x + b, and a token is routed iff sigmoid(r) > 0.5, in every routing mode.

    Deviation: not in the paper. Its top-k is not causal, so sampling needs a second rule
    (Sec 3.5); a threshold is causal by construction, so training routes exactly as sampling
    does. The routed count varies per sequence; the auxiliary loss (RoutedLayer) keeps the routed
    share near the capacity. The bias b is the learned threshold (it starts at 0).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__(d_model)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x_BTD: Tensor, generator: torch.Generator | None = None) -> Tensor:
        with float32_only(x_BTD.device.type):
            return F.linear(x_BTD.float(), self.weight.float()[None],
                            self.bias.float()[None]).squeeze(-1)


class AttentionRouter(nn.Module):
    """A-MoD's parameter-free router: a token's score is the attention it received in the
    previous block (`attention_received`), which the model passes in as the routed layer's prior.

    It has no score of its own for a lone token (forward gives zeros, which only a decode step's
    constant weights read), and no causal rule: its scores depend on later queries, so sampling
    uses the predictor, trained on its top-k as for the learned router (Sec 3.5, fix 2).
    """

    NO_ROUTER_RULE = ("routing.router='attention' (A-MoD) has no causal router rule: its scores "
                      "depend on later tokens; use mode='predictor'")

    def causal_threshold(self, capacity: float) -> float:
        raise ValueError(self.NO_ROUTER_RULE)

    def forward(self, x_BTD: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        return x_BTD.new_zeros(B, T, dtype=torch.float32)


def attention_received(q_BHTd: Tensor, k_BGTd: Tensor, scale: float | None = None) -> Tensor:
    """A-MoD's routing score for a causal model, (B, T): the attention each token receives
    relative to a uniform share, averaged over heads and over the queries that can attend to it:
    score_j = mean over heads h and queries i >= j of (i + 1) * p_h(i -> j).

    Deviation: A-MoD (bidirectional ViTs) averages the raw probabilities over all queries.
    Under a causal mask token j is seen only by the T - j queries at or after it, and query i
    spreads its attention over i + 1 keys, so raw sums or means would favour early tokens; with
    both corrections uniform attention scores every token 1. No gradient: the router has no
    weights to train.
    """
    with torch.no_grad(), float32_only(q_BHTd.device.type):
        B, H, T, Dh = q_BHTd.shape
        k_BHTd = k_BGTd.repeat_interleave(H // k_BGTd.shape[1], dim=1)
        s = 1.0 / math.sqrt(Dh) if scale is None else scale
        logits_BHTT = torch.matmul(q_BHTd.float(), k_BHTd.float().transpose(-1, -2)) * s
        future_TT = torch.ones(T, T, dtype=torch.bool, device=q_BHTd.device).triu(1)
        p_BHTT = logits_BHTT.masked_fill(future_TT, -math.inf).softmax(dim=-1)
        keys_T = torch.arange(1, T + 1, device=q_BHTd.device, dtype=torch.float32)
        relative_BT = (p_BHTT * keys_T[:, None]).sum(dim=(1, 2))      # sum over h, i of (i+1) p
        return relative_BT / (H * keys_T.flip(0))                     # T - j queries see token j


class Predictor(nn.Module):
    """Logit that the token is in its sequence's top-k, from a stop-gradient copy of x.

    Deviation: the paper says only "a small auxiliary MLP"; ours is Linear(D, P) -> SiLU ->
    Linear(P, 1) with P = d_model / 8 by default, in float32.
    outputs=2 (a block that routes keys and values apart, `routing.kv_capacity`): a second
    logit, of top-k_kv membership, from the same hidden layer; the output is then (B, T, 2).
    """

    def __init__(self, d_model: int, hidden: int, outputs: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=False)
        self.head = nn.Linear(hidden, outputs, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        # Paper Sec 3.5: "stop-gradient" input, so the predictor cannot shape the trunk or router.
        # Weights cast too: a model cast with .to(bfloat16) still predicts in float32.
        with float32_only(x_BTD.device.type):
            h_BTP = F.silu(F.linear(x_BTD.detach().float(), self.fc.weight.float()))
            return F.linear(h_BTP, self.head.weight.float()).squeeze(-1)
