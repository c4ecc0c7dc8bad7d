"""The next token from logits: greedy at temperature 0, else a draw from the softmax at that
temperature restricted to the top-k tokens and to the top-p nucleus.

Legend: N rows, V vocabulary.

Randomness is explicit: a draw takes one generator for the batch or one per row, so a row samples
the same tokens whatever else is in the batch. `sample_next` checks its arguments on every call;
the engine checks them once per generation (`_check_sampling`) and calls `_sample` on each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from modlm.generate.errors import GenerationError


def sample_next(logits_NV: Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """One token id per row: argmax when temperature is 0, else a draw from the softmax of
    logits / temperature restricted to the top_k largest and to the smallest set of tokens whose
    probability reaches top_p (both applied when both are given, top-k first). `generator` may be
    one generator for the batch or one per row (each row then draws from its own stream, so a row
    samples the same tokens whatever else is in the batch)."""
    _check_sampling(temperature, top_k, top_p)
    return _sample(logits_NV, temperature, top_k, top_p, generator)


def _sample(logits_NV: Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """`sample_next` without the argument checks: the engine checks them once per generation,
    not on every decode step."""
    if temperature == 0.0:
        return logits_NV.argmax(dim=-1)
    logits_NV = logits_NV.float()
    # Shift before dividing so a tiny temperature gives large finite logits, not inf - inf.
    logits_NV = (logits_NV - logits_NV.max(dim=-1, keepdim=True).values) / temperature
    V = logits_NV.shape[-1]
    if top_k is not None and top_k < V:
        kth_N1 = torch.topk(logits_NV, top_k, dim=-1).values[:, -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth_N1, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_NV, order_NV = torch.sort(logits_NV, dim=-1, descending=True)
        probs_NV = torch.softmax(sorted_NV, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first stays.
        drop_NV = probs_NV.cumsum(dim=-1) - probs_NV >= top_p
        logits_NV = logits_NV.scatter(-1, order_NV, sorted_NV.masked_fill(drop_NV, -math.inf))
    probs_NV = torch.softmax(logits_NV, dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs_NV, 1, generator=generator).squeeze(-1)
    return torch.cat([torch.multinomial(p_V, 1, generator=g)
                      for p_V, g in zip(probs_NV, generator, strict=True)])


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (isinstance(temperature, (int, float)) and temperature >= 0.0
            and math.isfinite(temperature)):
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                              or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p!r}")
