"""How far a retrofitted model's outputs start from the original model's (`modlm retrofit`,
benchmarks/retrofit_closeness.py).

Legend: B batch, T time, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from modlm.block import RoutingMode

if TYPE_CHECKING:
    from modlm.hf.retrofit import RetrofitLM


@dataclass(frozen=True)
class Closeness:
    """How far a retrofitted model's outputs are from the original model's on one batch."""

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    loss_original: float
    loss_retrofit: float
    top1_agreement: float      # share of positions where both models' most likely token agrees


@torch.no_grad()
def measure_closeness(model: RetrofitLM, ids_BT1: Tensor, mode: RoutingMode = "topk"
                      ) -> Closeness:
    """Compare the retrofitted model with the original (its layers run densely) on windows of
    T + 1 tokens: |logit difference| and the next-token loss of both."""
    was_training = model.training
    model.eval()
    x_BT, y_BT = ids_BT1[:, :-1], ids_BT1[:, 1:]
    ref_BTV = model.original_logits(x_BT)
    out_BTV = model(x_BT, mode=mode).logits_BTV
    model.train(was_training)
    diff = (out_BTV - ref_BTV).abs()

    def loss(logits_BTV: Tensor) -> float:
        return float(F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten()))

    return Closeness(float(diff.max()), float(diff.mean()), loss(ref_BTV), loss(out_BTV),
                     float((out_BTV.argmax(-1) == ref_BTV.argmax(-1)).float().mean()))
