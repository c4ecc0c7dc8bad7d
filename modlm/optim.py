"""AdamW parameter groups and the learning-rate schedule.

- Weight decay applies to matrices (linear layers) only; norms, the 1-D router vectors and the
  embedding are not decayed unless `decay_all` is set (the GPT-2 / nanoGPT convention).
- Schedule: linear warm-up to the peak, then cosine decay to `min_lr_ratio * peak` over exactly
  the rest of the run (paper Sec 4: "cosine schedule over 1x the training steps").
"""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float,
                     decay_all: bool = False) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied embeddings appear once
        is_matrix = p.dim() >= 2 and "embed" not in name
        (decay if decay_all or is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float,
                    decay_all: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay, decay_all), lr=lr,
                             betas=betas, eps=eps)


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int,
          min_lr_ratio: float) -> float:
    """Learning rate for 0-based `step` of `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = peak * min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
