"""Transformer layers that work on any subset of a sequence's tokens.

Legend: B batch, T time, K tokens taken part (T for a dense block, the routed k for MoD),
D model width, H heads, Dh head width, F MLP hidden width.

Attention takes the tokens' true positions, so a routed block's gathered tokens get rotary
embeddings at their original positions (paper Sec 3.4, paper.md "Decisions"), and causal masking
over the gathered axis equals causal masking by original position because the gathered tokens are
in time order. Rotary uses the half-split ("rotate_half") layout of GPT-NeoX / Llama.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modlm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x_BKD: Tensor) -> Tensor:
        return F.rms_norm(x_BKD, (x_BKD.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """Cos/sin tables for rotary positions, indexed by true token positions."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles_TR = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # Non-persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("cos_TR", angles_TR.cos().float(), persistent=False)
        self.register_buffer("sin_TR", angles_TR.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (T,) or (B, K) -> cos, sin shaped to broadcast over (B, K, H, Dh/2)."""
        return self.cos_TR[positions].unsqueeze(-2), self.sin_TR[positions].unsqueeze(-2)


def apply_rotary(x_BKHd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x_BKHd.chunk(2, dim=-1)
    cos, sin = cos.to(x_BKHd.dtype), sin.to(x_BKHd.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention among the K given tokens (all of q, k, v from them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BKD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, K, D = x_BKD.shape
        q_BKHd, k_BKHd, v_BKHd = self.qkv(x_BKD).view(B, K, 3, self.n_heads, -1).unbind(2)
        q_BKHd, k_BKHd = apply_rotary(q_BKHd, cos, sin), apply_rotary(k_BKHd, cos, sin)
        # The K axis is in time order, so is_causal masks by original position.
        y_BHKd = F.scaled_dot_product_attention(
            q_BKHd.transpose(1, 2), k_BKHd.transpose(1, 2), v_BKHd.transpose(1, 2), is_causal=True)
        return self.out(y_BHKd.transpose(1, 2).reshape(B, K, D))


class MLP(nn.Module):
    """SwiGLU (down(silu(gate(x)) * up(x))) or GELU (down(gelu(up(x)))), no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        n_in = 2 if cfg.mlp == "swiglu" else 1
        self.up = nn.Linear(cfg.d_model, n_in * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x_BKD: Tensor) -> Tensor:
        if self.kind == "swiglu":
            gate_BKF, up_BKF = self.up(x_BKD).chunk(2, dim=-1)
            return self.down(F.silu(gate_BKF) * up_BKF)
        return self.down(F.gelu(self.up(x_BKD)))
