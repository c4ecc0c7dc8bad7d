"""Transformer layers that work on any subset of a sequence's tokens.

Legend: B batch, T time, K tokens taken part (T for a dense block, the routed k for MoD),
D model width, H heads, Dh head width, F MLP hidden width.

Attention takes the tokens' true positions, so a routed block's gathered tokens get rotary
embeddings at their original positions (the routed block of paper Sec 3.4; the paper does not say
which positions, docs/design.md lists our choice), and causal masking over the gathered axis equals
causal masking by original position because the gathered tokens are in time order.
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
    """Rotary position table, indexed by true token positions.

    Pairs (x[2i], x[2i+1]) of each head rotate by position * theta^(-2i/Dh): the interleaved
    layout of RoFormer and Meta's Llama, applied as one complex multiply, which on a CPU costs
    a fraction of the half-split form's slices and concatenations. (Hugging Face's Llama stores q
    and k projections permuted for the half-split form; converting weights applies that
    permutation.)
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles_TR = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # Real (cos, sin) pairs rather than a complex buffer, which module.to(dtype) would refuse;
        # non-persistent: derived from the config, checkpoints need not carry them.
        self.register_buffer("cos_sin_TR2", torch.stack((angles_TR.cos(), angles_TR.sin()), -1)
                             .float(), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        """positions (T,) or (B, K) -> complex rotations (T, R) or (B, K, R), R = Dh / 2; under
        torch.compile, which generates no code for complex numbers, their (cos, sin) pairs
        (T, R, 2) or (B, K, R, 2) instead."""
        # .float(): a model cast to bfloat16 casts this table too, and complex needs float32.
        cos_sin = self.cos_sin_TR2[positions].float()
        return cos_sin if torch.compiler.is_compiling() else torch.view_as_complex(cos_sin)


def apply_rotary(x_BKNHd: Tensor, rot_BKR: Tensor) -> Tensor:
    """Rotate q and k together: x (B, K, N, H, Dh) with N stacked tensors, rotations (B, K, R)."""
    shape = x_BKNHd.shape
    pairs = x_BKNHd.float().reshape(*shape[:-1], -1, 2)
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex ops but fuses this real form into one kernel.
        if rot_BKR.is_complex():
            rot_BKR = torch.view_as_real(rot_BKR)
        cos, sin = rot_BKR[..., None, None, :, 0], rot_BKR[..., None, None, :, 1]
        x0, x1 = pairs.unbind(-1)
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * rot_BKR[..., None, None, :])
    return out.reshape(shape).to(x_BKNHd.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention among the K given tokens (all of q, k, v from them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def project(self, x_BKD: Tensor, rot_BKR: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys rotated at the tokens' true positions, and values: (B, K, H, Dh)."""
        B, K, _ = x_BKD.shape
        qkv_BK3Hd = self.qkv(x_BKD).view(B, K, 3, self.n_heads, -1)
        q_BKHd, k_BKHd = apply_rotary(qkv_BK3Hd[:, :, :2], rot_BKR).unbind(2)
        return q_BKHd, k_BKHd, qkv_BK3Hd[:, :, 2]

    def merge(self, y_BHKd: Tensor) -> Tensor:
        """The heads' outputs (B, H, K, Dh) through the output projection: (B, K, D)."""
        B, H, K, Dh = y_BHKd.shape
        return self.out(y_BHKd.transpose(1, 2).reshape(B, K, H * Dh))

    def forward(self, x_BKD: Tensor, rot_BKR: Tensor) -> Tensor:
        q_BKHd, k_BKHd, v_BKHd = self.project(x_BKD, rot_BKR)
        # The K axis is in time order, so is_causal masks by original position.
        y_BHKd = attend(q_BKHd.transpose(1, 2), k_BKHd.transpose(1, 2), v_BKHd.transpose(1, 2),
                        is_causal=True)
        return self.merge(y_BHKd)


def attend(q_BHKd: Tensor, k_BGSd: Tensor, v_BGSd: Tensor, *, scale: float | None = None,
           is_causal: bool = False, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention of K queries over S keys (the same tokens, or a KV cache),
    with grouped-query attention when there are fewer key/value heads G than query heads H.
    scale None is 1/sqrt(Dh)."""
    # bool(): under torch.compile with dynamic head counts the comparison is symbolic.
    return F.scaled_dot_product_attention(q_BHKd, k_BGSd, v_BGSd, attn_mask=mask,
                                          dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                          enable_gqa=bool(q_BHKd.shape[1] != k_BGSd.shape[1]))


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
