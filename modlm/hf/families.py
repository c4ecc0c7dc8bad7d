"""The Hugging Face decoder families a model can be retrofitted from, and how to drive each.

Legend: B batch, T time, K tokens (all, or the routed ones), D model width, H heads, Dh head width.

A `Family` says where a backbone keeps its modules (embeddings, decoder layers, final norm, LM
head, rotary table) and how a decoder layer is called; `family_of(hf_config)` picks it from the
config's `model_type`, refusing others with `RetrofitError`. `RotaryLayer` and `GPT2Layer` put a
decoder layer's own modules and weights behind modlm's `DecoderLayer` interface (project the new
tokens to queries, keys and values at their positions, attend, finish the layer), which the
routed layer (retrofit.py) and the generation engine drive.

Importing this module loads nothing from `transformers`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modlm.block import DecoderLayer
from modlm.config import ConfigError

ROTARY_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = (*ROTARY_FAMILY, "gpt2")


class RetrofitError(ConfigError):
    """A model cannot be retrofitted or run as asked; the message says why and what to do."""


# ---- families: where each backbone keeps its modules ------------------------------------------

class Family:
    """Where a backbone keeps its modules and how its decoder layers are called."""

    def layers(self, hf: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, hf: nn.Module, idx_BT: Tensor, pos_BT: Tensor) -> Tensor:
        raise NotImplementedError

    def positions(self, hf: nn.Module, x_BTD: Tensor, pos_BT: Tensor) -> Any:
        """What a layer needs about positions besides the hidden states (None for GPT-2)."""
        return None

    def call(self, layer: nn.Module, x_BKD: Tensor, mask: Tensor | None, pos_BK: Tensor,
             pe: Any) -> Tensor:
        raise NotImplementedError

    def head(self, hf: nn.Module, x_BTD: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, layer: nn.Module, hf_config: Any) -> DecoderLayer:
        """The layer behind modlm's `DecoderLayer` interface (what the engine drives)."""
        raise NotImplementedError


class RotaryFamily(Family):
    """Llama and the models that share its layout (Mistral, Qwen2, Qwen3): `model.embed_tokens`,
    `model.layers`, `model.norm`, `model.rotary_emb`, `lm_head`; each layer takes the rotary
    (cos, sin) of its tokens' positions as `position_embeddings`."""

    def layers(self, hf: nn.Module) -> nn.ModuleList:
        return hf.model.layers

    def embed(self, hf: nn.Module, idx_BT: Tensor, pos_BT: Tensor) -> Tensor:
        return hf.model.embed_tokens(idx_BT)

    def positions(self, hf: nn.Module, x_BTD: Tensor, pos_BT: Tensor) -> tuple[Tensor, Tensor]:
        return hf.model.rotary_emb(x_BTD, position_ids=pos_BT)     # cos, sin: (B, T, Dh)

    def call(self, layer: nn.Module, x_BKD: Tensor, mask: Tensor | None, pos_BK: Tensor,
             pe: tuple[Tensor, Tensor]) -> Tensor:
        return _hidden(layer(x_BKD, attention_mask=mask, position_ids=pos_BK,
                             position_embeddings=pe))

    def head(self, hf: nn.Module, x_BTD: Tensor) -> Tensor:
        return hf.lm_head(hf.model.norm(x_BTD))

    def step(self, layer: nn.Module, hf_config: Any) -> DecoderLayer:
        return RotaryLayer(layer, hf_config)


class GPT2Family(Family):
    """GPT-2: learned positions added to the token embeddings before the first layer, so a routed
    layer's gathered hidden states already carry their true positions."""

    def layers(self, hf: nn.Module) -> nn.ModuleList:
        return hf.transformer.h

    def embed(self, hf: nn.Module, idx_BT: Tensor, pos_BT: Tensor) -> Tensor:
        t = hf.transformer
        return t.drop(t.wte(idx_BT) + t.wpe(pos_BT))

    def call(self, layer: nn.Module, x_BKD: Tensor, mask: Tensor | None, pos_BK: Tensor,
             pe: Any) -> Tensor:
        return _hidden(layer(x_BKD, attention_mask=mask))

    def head(self, hf: nn.Module, x_BTD: Tensor) -> Tensor:
        return hf.lm_head(hf.transformer.ln_f(x_BTD))

    def step(self, layer: nn.Module, hf_config: Any) -> DecoderLayer:
        return GPT2Layer(layer, hf_config)


# ---- decoder layers behind modlm's DecoderLayer interface ---------------------------------------

class RotaryLayer:
    """A Llama-family decoder layer as a `DecoderLayer`: input norm, q/k/v projections (Qwen3's
    per-head q/k norms), Hugging Face's half-split rotary at the given (cos, sin), grouped-query
    attention, o_proj, post-attention norm and MLP, with the layer's own modules and weights."""

    def __init__(self, layer: nn.Module, hf_config: Any) -> None:
        attn = layer.self_attn
        self.module = layer
        self.head_dim = attn.head_dim
        self.n_heads = hf_config.num_attention_heads
        self.n_kv_heads = hf_config.num_key_value_heads
        self.attn_scale = attn.scaling
        self._qk_norm = hasattr(attn, "q_norm")

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.module.self_attn.k_proj.weight.dtype

    def project(self, x_BKD: Tensor, pe: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.module.self_attn
        h_BKD = _rms_norm(self.module.input_layernorm, x_BKD)
        B, K, _ = h_BKD.shape
        q = attn.q_proj(h_BKD).view(B, K, -1, self.head_dim)
        k = attn.k_proj(h_BKD).view(B, K, -1, self.head_dim)
        v = attn.v_proj(h_BKD).view(B, K, -1, self.head_dim)
        if self._qk_norm:
            q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
        # Queries and keys rotate together (one set of kernels for both).
        qk = _rotate(torch.cat((q, k), dim=2), pe[0][:, :, None, :], pe[1][:, :, None, :])
        return qk[:, :, :self.n_heads], qk[:, :, self.n_heads:], v

    def attention_dropout(self) -> float:
        return float(self.module.self_attn.attention_dropout) if self.module.training else 0.0

    def attn_out(self, y_BHKd: Tensor) -> Tensor:
        B, H, K, Dh = y_BHKd.shape
        return self.module.self_attn.o_proj(y_BHKd.transpose(1, 2).reshape(B, K, H * Dh))

    def mlp_update(self, h_BKD: Tensor, valid_BK: Tensor | None = None,
                   drop_overflow: bool = True) -> tuple[Tensor, None]:
        layer = self.module
        return layer.mlp(_rms_norm(layer.post_attention_layernorm, h_BKD)), None


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A Llama-family RMSNorm with fewer kernels than its Python forward and the same rounding:
    normalise in float32, cast back to the input's dtype, then scale by the weight. Any other
    norm module runs as it is."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or not type(norm).__name__.endswith("RMSNorm"):
        return norm(x)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _rotate(x_BKHd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Hugging Face's rotary layout: the two halves of each head rotate together."""
    x1, x2 = x_BKHd.chunk(2, dim=-1)
    return x_BKHd * cos + torch.cat((-x2, x1), dim=-1) * sin


class GPT2Layer:
    """A GPT-2 block as a `DecoderLayer`: ln_1, the fused q/k/v projection, attention (GPT-2's
    scale, per-layer inverse scaling included), c_proj, ln_2 and MLP, dropouts where training."""

    def __init__(self, layer: nn.Module, hf_config: Any) -> None:
        self.module = layer
        self.n_heads = self.n_kv_heads = hf_config.n_head
        self.head_dim = hf_config.n_embd // hf_config.n_head
        self.attn_scale = float(layer.attn.scaling)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.module.attn.c_attn.weight.dtype

    def project(self, x_BKD: Tensor, pe: None) -> tuple[Tensor, Tensor, Tensor]:
        h_BKD = self.module.ln_1(x_BKD)
        B, K, D = h_BKD.shape
        q, k, v = self.module.attn.c_attn(h_BKD).split(D, dim=2)
        shape = (B, K, self.n_heads, self.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)

    def attention_dropout(self) -> float:
        return float(self.module.attn.attn_dropout.p) if self.module.training else 0.0

    def attn_out(self, y_BHKd: Tensor) -> Tensor:
        B, H, K, Dh = y_BHKd.shape
        attn = self.module.attn
        return attn.resid_dropout(attn.c_proj(y_BHKd.transpose(1, 2).reshape(B, K, H * Dh)))

    def mlp_update(self, h_BKD: Tensor, valid_BK: Tensor | None = None,
                   drop_overflow: bool = True) -> tuple[Tensor, None]:
        return self.module.mlp(self.module.ln_2(h_BKD)), None


def _hidden(out: Any) -> Tensor:
    """A decoder layer's hidden states (older transformers versions return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


# ---- choosing a family, and what the forward asks of the config ----------------------------------

def family_of(hf_config: Any) -> Family:
    model_type = getattr(hf_config, "model_type", None)
    if model_type in ROTARY_FAMILY:
        return RotaryFamily()
    if model_type == "gpt2":
        if getattr(hf_config, "add_cross_attention", False):
            raise RetrofitError("GPT-2 models with cross-attention are not supported; retrofit a "
                                "decoder-only GPT-2 (add_cross_attention=false)")
        return GPT2Family()
    raise RetrofitError(f"cannot retrofit a Hugging Face model of type {model_type!r}: supported "
                        f"are {SUPPORTED_MODEL_TYPES} (decoder layers with the Llama or GPT-2 "
                        f"layout)")


def causal_mask(hf_config: Any, x_BKD: Tensor, padding_BK: Tensor | None) -> Tensor | None:
    """The attention mask Hugging Face builds for a causal forward over these tokens (the
    unrouted layers of a full-sequence forward), in the form the configured implementation takes
    (None: sdpa's is_causal; a 4-D float mask for eager, with padding)."""
    from transformers.masking_utils import create_causal_mask
    return create_causal_mask(config=hf_config, inputs_embeds=x_BKD, attention_mask=padding_BK,
                              cache=None)


def sliding_window(hf_config: Any) -> int | None:
    """The attention window of a model whose layers use one, else None."""
    window = getattr(hf_config, "sliding_window", None)
    types = getattr(hf_config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)

