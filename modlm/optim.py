"""AdamW parameter groups and the learning-rate schedule.

- Weight decay applies to matrices (linear layers) only; norms, the 1-D router vectors and the
  embedding are not decayed unless `decay_all` is set (the GPT-2 / nanoGPT convention).
- Schedule: linear warm-up to the peak, then cosine decay to `min_lr_ratio * peak` over exactly
  the rest of the run (paper Sec 4: "cosine schedule over 1x the training steps").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float, decay_all: bool = False,
                     lr_scales: Mapping[int, float] | None = None) -> list[dict]:
    """A decayed and an undecayed group per learning-rate scale (the scale-1 pair first, so a
    model without scales has the same two groups as ever). lr_scales maps id(parameter) to a
    multiple of the scheduled learning rate (default 1; a retrofit's pretrained weights)."""
    groups: dict[float, tuple[list[nn.Parameter], list[nn.Parameter]]] = {1.0: ([], [])}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied embeddings appear once
        is_matrix = p.dim() >= 2 and "embed" not in name
        scale = 1.0 if lr_scales is None else float(lr_scales.get(id(p), 1.0))
        decay, no_decay = groups.setdefault(scale, ([], []))
        (decay if decay_all or is_matrix else no_decay).append(p)
    if not seen:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    return [g for scale, (decay, no_decay) in groups.items()
            for g in ({"params": decay, "weight_decay": weight_decay, "lr_scale": scale},
                      {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale})]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, decay_all: bool = False,
                    lr_scales: Mapping[int, float] | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay, decay_all, lr_scales), lr=lr,
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
    """The scheduled rate, times each group's lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
