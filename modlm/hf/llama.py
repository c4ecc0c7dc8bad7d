"""A dense modlm model is a Llama: the weight mapping both ways, and converters.

Legend: D model width, H heads, Dh head width, F MLP hidden width, V vocabulary.

A dense modlm model with a SwiGLU MLP (no routed block, no MoE) computes what Hugging Face's
`LlamaForCausalLM` computes: pre-norm RMSNorm blocks, rotary positions, SwiGLU MLP, no biases,
full multi-head attention (no grouped keys). `tests/test_hf.py` checks that both give the same
logits for the same weights, so modlm's dense baseline is a standard transformer.

| modlm                        | Llama                                                  |
|------------------------------|--------------------------------------------------------|
| embed.weight                 | model.embed_tokens.weight                              |
| blocks.i.attn_norm.weight    | model.layers.i.input_layernorm.weight                  |
| blocks.i.attn.qkv.weight     | self_attn.q_proj / k_proj / v_proj: rows q; k; v of    |
|   (3D, D)                    |   modlm's fused matrix, q and k rows permuted (below)  |
| blocks.i.attn.out.weight     | self_attn.o_proj.weight                                |
| blocks.i.mlp_norm.weight     | post_attention_layernorm.weight                        |
| blocks.i.mlp.up.weight       | mlp.gate_proj (its first F rows), mlp.up_proj (last F) |
|   (2F, D)                    |                                                        |
| blocks.i.mlp.down.weight     | mlp.down_proj.weight                                   |
| norm.weight                  | model.norm.weight                                      |
| lm_head.weight               | lm_head.weight; tie_embeddings = tie_word_embeddings   |

Rotary layouts: modlm rotates interleaved pairs (x[2i], x[2i+1]) (RoFormer, Meta's Llama code);
transformers rotates half-split pairs (x[i], x[i + Dh/2]); both turn pair i by position *
theta^(-2i/Dh). So a transformers q or k row j of a head is modlm's row `rope_permutation(Dh)[j]`:
row 2j for j < Dh/2, row 2(j - Dh/2) + 1 after (the permutation every Meta-to-HF Llama conversion
applies). Permuting q and k alike leaves every score q.k unchanged; v, the output projection and
the MLP are not permuted.

Config: hidden_act silu, rms_norm_eps = norm_eps, rope_theta, max_position_embeddings =
max_seq_len, head_dim = d_model / n_heads, num_key_value_heads = n_heads, attention_bias and
mlp_bias False.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from modlm.config import ModelConfig, RoutingConfig
from modlm.model import MoDLM


def check_llama_compatible(cfg: ModelConfig) -> None:
    """Raise ValueError unless `cfg` is a dense SwiGLU modlm model (what a Llama can hold)."""
    if not cfg.is_dense:
        raise ValueError(f"only a dense modlm model maps onto Llama; this one routes blocks "
                         f"{list(cfg.routed_layers)}. Use modlm.hf.modeling.ModLMForCausalLM "
                         f"for Mixture-of-Depths models")
    if getattr(cfg, "moe_layers", ()):
        raise ValueError(f"blocks {list(cfg.moe_layers)} have mixture-of-experts MLPs, which "
                         f"Llama has not; only a dense MLP maps onto Llama")
    if cfg.mlp != "swiglu":
        raise ValueError(f"Llama's MLP is SwiGLU; this model has mlp={cfg.mlp!r}")


def rope_permutation(head_dim: int) -> Tensor:
    """Index j -> the modlm row a transformers (half-split) q/k row j of one head takes."""
    half = torch.arange(head_dim // 2)
    return torch.cat((2 * half, 2 * half + 1))


def llama_config(cfg: ModelConfig, **overrides: Any) -> Any:
    """The `LlamaConfig` of a dense modlm model; keyword overrides pass through (e.g.
    attn_implementation="eager", bos_token_id=...)."""
    from transformers import LlamaConfig

    check_llama_compatible(cfg)
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    fields.update(overrides)
    return LlamaConfig(**fields)


def modlm_config_from_llama(config: Any) -> ModelConfig:
    """The dense modlm `ModelConfig` equal to a `LlamaConfig`; refuses what modlm cannot hold."""
    H = config.num_attention_heads
    problems = []
    if (config.num_key_value_heads or H) != H:
        problems.append(f"grouped keys (num_key_value_heads={config.num_key_value_heads}, "
                        f"num_attention_heads={H})")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (modlm's SwiGLU uses silu)")
    if config.attention_bias or config.mlp_bias:
        problems.append("biases (attention_bias / mlp_bias)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // H
    if head_dim * H != config.hidden_size:
        problems.append(f"head_dim={head_dim} x {H} heads != hidden_size={config.hidden_size}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (modlm has plain rotary only)")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={config.pretraining_tp}")
    if problems:
        raise ValueError("this Llama config has no modlm equivalent: " + "; ".join(problems))
    return ModelConfig(
        vocab_size=config.vocab_size, d_model=config.hidden_size,
        n_layers=config.num_hidden_layers, n_heads=H, d_mlp=config.intermediate_size,
        mlp="swiglu", max_seq_len=config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        tie_embeddings=bool(config.tie_word_embeddings), norm_eps=float(config.rms_norm_eps),
        init_std=float(config.initializer_range),
        routing=RoutingConfig(router="none", layers="none", predictor=False,
                              aux_loss_weight=0.0))


def modlm_to_llama_state_dict(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """modlm state-dict names and layouts -> `LlamaForCausalLM` ones (see the module docstring)."""
    check_llama_compatible(cfg)
    D, H, Dh, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.mlp_hidden
    perm = rope_permutation(Dh)
    out = {"model.embed_tokens.weight": state["embed.weight"],
           "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q_DD, k_DD, v_DD = state[src + "attn.qkv.weight"].split(D, dim=0)
        gate_FD, up_FD = state[src + "mlp.up.weight"].split(F, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": _permute_heads(q_DD, H, Dh, perm),
            dst + "self_attn.k_proj.weight": _permute_heads(k_DD, H, Dh, perm),
            dst + "self_attn.v_proj.weight": v_DD,
            dst + "self_attn.o_proj.weight": state[src + "attn.out.weight"],
            dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate_FD,
            dst + "mlp.up_proj.weight": up_FD,
            dst + "mlp.down_proj.weight": state[src + "mlp.down.weight"],
        })
    return {k: v.detach().clone() for k, v in out.items()}


def llama_to_modlm_state_dict(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """`LlamaForCausalLM` state-dict names and layouts -> modlm ones (inverse of the above)."""
    check_llama_compatible(cfg)
    H, Dh = cfg.n_heads, cfg.head_dim
    inverse = torch.argsort(rope_permutation(Dh))
    lm_head = state.get("lm_head.weight")
    if lm_head is None:
        if not cfg.tie_embeddings:
            raise ValueError("the Llama state dict has no lm_head.weight and the model is untied")
        lm_head = state["model.embed_tokens.weight"]
    out = {"embed.weight": state["model.embed_tokens.weight"],
           "norm.weight": state["model.norm.weight"], "lm_head.weight": lm_head}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out.update({
            dst + "attn_norm.weight": state[src + "input_layernorm.weight"],
            dst + "attn.qkv.weight": torch.cat((
                _permute_heads(state[src + "self_attn.q_proj.weight"], H, Dh, inverse),
                _permute_heads(state[src + "self_attn.k_proj.weight"], H, Dh, inverse),
                state[src + "self_attn.v_proj.weight"])),
            dst + "attn.out.weight": state[src + "self_attn.o_proj.weight"],
            dst + "mlp_norm.weight": state[src + "post_attention_layernorm.weight"],
            dst + "mlp.up.weight": torch.cat((state[src + "mlp.gate_proj.weight"],
                                              state[src + "mlp.up_proj.weight"])),
            dst + "mlp.down.weight": state[src + "mlp.down_proj.weight"],
        })
    return {k: v.detach().clone() for k, v in out.items()}


def to_llama(model: MoDLM, **config_overrides: Any) -> Any:
    """A `LlamaForCausalLM` computing what the dense `model` computes (same dtype and device),
    in eval mode. Keyword arguments override `LlamaConfig` fields (e.g.
    attn_implementation="eager")."""
    from transformers import LlamaForCausalLM

    cfg = model.cfg
    weight = model.embed.weight
    llama = LlamaForCausalLM(llama_config(cfg, **config_overrides))
    llama.load_state_dict(modlm_to_llama_state_dict(model.state_dict(), cfg), strict=True)
    return llama.to(device=weight.device, dtype=weight.dtype).eval()


def from_llama(llama: Any) -> MoDLM:
    """A dense modlm model with the weights of a `LlamaForCausalLM` (float32 on the CPU unless
    the Llama is elsewhere), in eval mode."""
    cfg = modlm_config_from_llama(llama.config)
    weight = llama.model.embed_tokens.weight
    with torch.device(weight.device):
        model = MoDLM(cfg)
    model.load_state_dict(llama_to_modlm_state_dict(llama.state_dict(), cfg), strict=True)
    return model.to(dtype=weight.dtype).eval()


def _permute_heads(w_DD: Tensor, H: int, Dh: int, perm: Tensor) -> Tensor:
    """Reorder the Dh rows within each of the H heads of a (H * Dh, D) projection."""
    return w_DD.reshape(H, Dh, -1)[:, perm.to(w_DD.device)].reshape(H * Dh, -1)
