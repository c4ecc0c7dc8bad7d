"""FLOP and parameter accounting (modlm/flops.py) checked against torch's FlopCounterMode.

FlopCounterMode does not count the CPU fused attention kernel, so the model runs under the MATH
SDPA backend, whose attention decomposes into two bmm calls the counter sees.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modlm import flops
from modlm.config import ModelConfig, RoutingConfig
from modlm.model import MoDLM
from modlm.routing import capacity_k

CONFIGS = {
    "dense": dict(routing=dict(router="none")),
    "mod_every_other": dict(),
    "mod_all": dict(routing=dict(layers="all", first_layer_dense=False, capacity=0.25)),
    "gelu": dict(mlp="gelu", routing=dict(capacity=0.5)),
    "untied": dict(tie_embeddings=False, d_model=48, n_heads=3),
    "random_router": dict(routing=dict(router="random", predictor=False, aux_loss_weight=0.0)),
    "no_predictor": dict(routing=dict(predictor=False, router_weight="raw")),
    # no loss reaches the predictor / the router: they run forward only in training
    "predictor_weight_0": dict(routing=dict(predictor_loss_weight=0.0)),
    "router_untrained": dict(routing=dict(router_weight="constant", aux_loss_weight=0.0)),
    # routers beyond the paper's: A-MoD's Q K^T in the block before (no backward), and keys and
    # values routed apart from queries (mode "topk" routes exactly k queries, k_kv keys/values)
    "attention_router": dict(routing=dict(router="attention", aux_loss_weight=0.0)),
    "kv": dict(routing=dict(capacity=0.25, kv_capacity=0.5)),
    "kv_attention_only": dict(routing=dict(capacity=0.125, kv_capacity=0.375, skip="attention")),
    "kv_random": dict(routing=dict(router="random", predictor=False, aux_loss_weight=0.0,
                                   capacity=0.25, kv_capacity=0.75)),
    "kv_per_layer": dict(routing=dict(capacities=(0.25, 0.5), kv_capacity=0.5)),
}
# Configurations only the decode-step FLOP test uses.
DECODE_CONFIGS = {"attention_only": dict(routing=dict(skip="attention"))}


def count(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter


def rel_close(a, b, rel=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_flops_match_counter(make_cfg, name):
    cfg = make_cfg(**CONFIGS[name])
    model = MoDLM(cfg)
    B, T = 3, 24
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        counted = count(lambda: model(idx, mode="topk")).get_total_flops() / B
    predicted = flops.forward_flops(cfg, T).total
    assert counted > 0
    assert rel_close(counted, predicted), (counted, predicted)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_flops_match_counter(make_cfg, name):
    cfg = make_cfg(**CONFIGS[name])
    model = MoDLM(cfg)
    B, T = 2, 16
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    tgt = torch.randint(0, cfg.vocab_size, (B, T))

    def step():
        model(idx, tgt).loss.backward()

    counted = count(step).get_total_flops() / B
    predicted = flops.training_flops(cfg, T)
    assert rel_close(counted, predicted), (counted, predicted)
    assert predicted > 2.9 * flops.forward_flops(cfg, T).total


def test_config_knobs_change_flops(make_cfg):
    """Each configuration above is a different compute budget, so each check above counts."""
    totals = {n: (flops.forward_flops(make_cfg(**kw), 24).total,
                  flops.training_flops(make_cfg(**kw), 24)) for n, kw in CONFIGS.items()}
    assert len(set(totals.values())) == len(totals), totals
    totals = {n: forward for n, (forward, _) in totals.items()}
    assert totals["mod_every_other"] < totals["dense"]


def test_attention_scores_in_routed_block_cost_k_over_T_squared(make_cfg):
    T = 24
    routed = make_cfg(n_layers=1, routing=dict(layers="all", first_layer_dense=False,
                                               capacity=0.25, predictor=False))
    dense = make_cfg(n_layers=1, routing=dict(router="none"))
    k = capacity_k(T, 0.25)
    assert k == 6
    f_r, f_d = flops.forward_flops(routed, T), flops.forward_flops(dense, T)
    assert f_r.attention_scores / f_d.attention_scores == pytest.approx((k / T) ** 2, rel=1e-12)
    assert f_r.attention_projections / f_d.attention_projections == pytest.approx(k / T, rel=1e-12)
    assert f_r.mlp / f_d.mlp == pytest.approx(k / T, rel=1e-12)
    # The counter agrees: attention is the only bmm in the model.
    idx = torch.randint(0, 99, (2, T))

    def bmm_flops(cfg):
        model = MoDLM(cfg)
        with torch.no_grad():
            counts = count(lambda: model(idx)).get_flop_counts()["Global"]
        return counts[torch.ops.aten.bmm]

    assert bmm_flops(routed) / bmm_flops(dense) == pytest.approx((k / T) ** 2, rel=1e-12)
    assert bmm_flops(dense) == 2 * f_d.attention_scores


def test_mod_over_dense_ratio_at_paper_settings():
    """Paper Sec 4.1's best setting, 12.5% every other block, needs about (1 + 1/8) / 2 of the
    dense matmul FLOPs."""
    dense = ModelConfig(vocab_size=256, d_model=512, n_layers=8, n_heads=8, max_seq_len=1024,
                        routing=RoutingConfig(router="none"))
    mod = dataclasses.replace(dense, routing=RoutingConfig())
    ratio = flops.forward_flops(mod, 1024).total / flops.forward_flops(dense, 1024).total
    assert 0.5 < ratio < 0.6
    assert flops.forward_flops(mod).seq_len == 1024  # default length is max_seq_len


def test_forward_flops_by_hand(make_cfg):
    cfg = make_cfg()  # D 32, F 37, V 99, 4 layers, routed 1 and 3, P 4
    T, k, D, F_, V, P = 16, 2, 32, 37, 99, 4
    f = flops.forward_flops(cfg, T)
    assert f.attention_projections == 2 * 4 * D * D * (2 * T + 2 * k)
    assert f.attention_scores == 4 * D * (2 * T * T + 2 * k * k)
    assert f.mlp == 2 * 3 * D * F_ * (2 * T + 2 * k)
    assert f.router == 2 * 2 * T * D
    assert f.predictor == 2 * 2 * T * (D * P + P)
    assert f.lm_head == 2 * T * D * V
    assert f.per_token == f.total / T
    assert f.as_dict()["total"] == f.total


def test_steps_for_budget(make_cfg):
    cfg = make_cfg()
    per_step = flops.training_flops(cfg, 16) * 4
    assert flops.steps_for_budget(cfg, 2.99 * per_step, batch_size=4, seq_len=16) == 2
    assert flops.steps_for_budget(cfg, 3.0 * per_step, batch_size=4, seq_len=16) == 3
    assert flops.steps_for_budget(cfg, per_step, batch_size=4, seq_len=16) == 1
    with pytest.raises(ValueError, match="less than one step"):
        flops.steps_for_budget(cfg, 0.99 * per_step, batch_size=4, seq_len=16)


def test_match_forward_flops_grows_depth(make_cfg):
    dense = make_cfg(n_layers=4, routing=dict(router="none"))
    routing = RoutingConfig()
    T = 32
    mod = flops.match_forward_flops(dense, routing, seq_len=T)
    target = flops.forward_flops(dense, T).total
    assert mod.routing == routing and mod.d_model == dense.d_model
    assert mod.n_layers > dense.n_layers
    got = flops.forward_flops(mod, T).total
    dense_f = flops.forward_flops(dense, T)
    one_layer = (dense_f.total - dense_f.lm_head) / dense.n_layers  # one dense block's FLOPs
    assert abs(got - target) <= one_layer
    # It is the closest depth: neighbours are no closer.
    for n in (mod.n_layers - 1, mod.n_layers + 1):
        other = flops.forward_flops(dataclasses.replace(mod, n_layers=n), T).total
        assert abs(other - target) >= abs(got - target)
    assert flops.param_count(mod).total > flops.param_count(dense).total


def test_match_forward_flops_grows_width(make_cfg):
    dense = make_cfg(n_layers=4, d_mlp=None, routing=dict(router="none"))
    mod = flops.match_forward_flops(dense, RoutingConfig(), vary="d_model", seq_len=32)
    assert mod.d_model > dense.d_model and mod.n_layers == dense.n_layers
    assert mod.head_dim % 2 == 0
    assert flops.param_count(mod).total > flops.param_count(dense).total


@pytest.mark.parametrize("name,rate,mode", [("dense", None, "router"),
                                            ("mod_every_other", 1.0, "router"),
                                            ("mod_every_other", 0.0, "router"),
                                            ("mod_every_other", 1.0, "predictor"),
                                            ("mod_every_other", 0.0, "predictor"),
                                            ("gelu", 1.0, "router"),
                                            ("no_predictor", 0.0, "router"),
                                            ("mod_all", 1.0, "router"),
                                            ("mod_all", 0.0, "predictor"),
                                            ("attention_only", 1.0, "router"),
                                            ("attention_only", 0.0, "predictor")])
def test_decode_flops_match_counter(make_cfg, name, rate, mode):
    """One decode step's FLOPs per row, counted, equal flops.decode_flops with the routed
    fraction the step had (every token routed or none, in prefill and decode alike, so each
    routed cache holds that share of the context)."""
    from modlm.generate import Engine
    cfg = make_cfg(**{**CONFIGS, **DECODE_CONFIGS}[name])
    if mode == "predictor":
        cfg = dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, predictor=True))
    model = MoDLM(cfg).eval()
    if rate is not None:
        for i in cfg.routed_layers:
            _force_routing(model.blocks[i], route=rate == 1.0)
    engine = Engine(model, mode)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1]]
    state, _ = engine.prefill(prompts)
    counted = count(lambda: engine.decode_step(state, [6, 5])).get_total_flops() / 2
    predicted = flops.decode_flops(cfg, 7, rate, mode)
    assert rel_close(counted, predicted.total)
    assert predicted.seq_len == 1 and predicted.lm_head == 2 * cfg.d_model * cfg.vocab_size
    if rate == 0.0:   # a routed block that nobody enters costs its causal rule only
        assert predicted.total < flops.decode_flops(cfg, 7, 1.0, mode).total


def _force_routing(layer, route: bool) -> None:
    """Make a routed block's causal rules route every token (or none) while their matmuls still
    run: the router's threshold moves out of reach, the predictor's logit is shifted."""
    layer.router.causal_threshold = lambda capacity: -math.inf if route else math.inf
    if layer.predictor is not None:
        real = layer.predictor.forward
        layer.predictor.forward = lambda x: real(x) * 0.0 + (1.0 if route else -1.0)
