"""Mixture-of-experts MLP, staged and integrated MoDE, the reduced-capacity foil (modlm/moe.py;
paper Sec 4.3): routing maths by hand, sparse dispatch, pass-through, losses, causality, FLOPs,
the generation engine and a short training run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modlm import flops, moe, presets
from modlm.block import Block
from modlm.config import ConfigError, MoEConfig
from modlm.generate import Engine
from modlm.layers import Rotary
from modlm.model import MoDLM

# Tiny tensors: on a busy 2-core machine two threads made single tests take 20-90 s.
pytestmark = pytest.mark.usefixtures("one_thread")

E = 3  # odd and distinct from top_k, heads and groups


def moe_cfg(make_cfg, routing=None, **moe_fields):
    fields = dict(experts=E) | moe_fields
    return make_cfg(routing=routing or dict(router="none"), moe=MoEConfig(**fields))


# ---- pure routing maths ------------------------------------------------------------------------

def test_slots_per_expert_by_hand():
    assert moe.slots_per_expert(16, 1, 4, 1.0) == 4
    assert moe.slots_per_expert(16, 1, 4, 1.25) == 5
    assert moe.slots_per_expert(16, 2, 4, 1.25) == 10          # top-2 doubles the slots
    assert moe.slots_per_expert(16, 1, 8, 0.5) == 1            # no-op choices share the slots
    assert moe.slots_per_expert(3, 1, 4, 0.01) == 1            # at least one slot
    assert moe.slots_per_expert(16, 2, 4, None) == 32          # no limit: every slot fits


def test_route_priority_slots_and_gates_by_hand():
    # One group of 4 tokens, 3 choices (2 real experts + 1 no-op), top-2, 2 slots per expert.
    logits_BKA = torch.log(torch.tensor([[[0.6, 0.3, 0.1],
                                          [0.5, 0.1, 0.4],
                                          [0.7, 0.2, 0.1],
                                          [0.2, 0.3, 0.5]]]))
    d = moe.route(logits_BKA, top_k=2, n_real=2, slots_per_expert=2)
    # Slots: first choices of tokens 0..3, then their second choices.
    assert d.expert_BS.tolist() == [[0, 0, 0, 2, 1, 2, 1, 1]]
    assert d.token_BS.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert d.rank_BS.tolist() == [[0, 1, 2, 0, 0, 1, 1, 2]]
    # Expert 0 overflows at token 2's first choice; no-op slots never compute; expert 1 takes
    # tokens 0 and 2, and token 3's second choice overflows it.
    assert d.keep_BS.tolist() == [[True, True, False, False, True, False, True, False]]
    torch.testing.assert_close(d.gate_BS[0, [0, 4]], torch.tensor([0.6, 0.3]) / 0.9)
    torch.testing.assert_close(d.gate_BS.view(2, 4).sum(0), torch.ones(4))

    # Padding tokens take no slot and never push a real token past its slots: with token 0
    # padding, token 2 fits expert 0 and token 3's second choice fits expert 1.
    valid_BK = torch.tensor([[False, True, True, True]])
    d = moe.route(logits_BKA, top_k=2, n_real=2, slots_per_expert=2, valid_BK=valid_BK)
    assert d.keep_BS.tolist() == [[False, True, True, False, False, False, True, True]]


def test_top1_gate_is_the_raw_probability():
    logits_BKA = torch.randn(2, 5, 4)
    d = moe.route(logits_BKA, top_k=1, n_real=4, slots_per_expert=99)
    probs = torch.softmax(logits_BKA, -1)
    torch.testing.assert_close(d.gate_BS, probs.amax(-1))
    assert d.keep_BS.all()


def test_load_balancing_loss_by_hand():
    probs_NA = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    first = torch.tensor([0, 0, 1, 0])
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    torch.testing.assert_close(moe.load_balancing_loss(probs_NA, first), torch.tensor(1.15))
    uniform = torch.full((4, 2), 0.5)
    torch.testing.assert_close(moe.load_balancing_loss(uniform, torch.tensor([0, 1, 0, 1])),
                               torch.tensor(1.0))


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(moe.router_z_loss(logits), torch.tensor(expected))


# ---- the layer ---------------------------------------------------------------------------------

def layer_and_input(make_cfg, B=2, K=13, seed=0, **moe_fields):
    cfg = moe_cfg(make_cfg, **moe_fields)
    torch.manual_seed(seed)
    layer = moe.MoE(cfg, layer=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer, torch.randn(B, K, cfg.d_model)


@pytest.mark.parametrize("top_k,noop,factor", [(1, 0, 1.25), (2, 0, 1.0), (1, 2, 0.5),
                                               (2, 1, None)])
def test_each_expert_computes_only_its_tokens(make_cfg, monkeypatch, top_k, noop, factor):
    layer, x_BKD = layer_and_input(make_cfg, top_k=top_k, noop_experts=noop,
                                   capacity_factor=factor)
    seen: dict[int, torch.Tensor] = {}
    original = moe.MoE.expert

    def spy(self, e, x_ND):
        seen[e] = x_ND.detach().clone()
        return original(self, e, x_ND)

    monkeypatch.setattr(moe.MoE, "expert", spy)
    out_BKD, stats = layer(x_BKD)
    with torch.no_grad():
        logits = x_BKD @ layer.router.weight.T
    cap = moe.slots_per_expert(x_BKD.shape[1], top_k, E + noop, factor)
    d = moe.route(logits, top_k, E, cap)
    for e in range(E):
        want = [x_BKD[b, d.token_BS[b, s]] for b, s in
                (d.keep_BS & (d.expert_BS == e)).nonzero().tolist()]
        got = seen.get(e, torch.empty(0, x_BKD.shape[-1]))
        # The expert saw exactly its kept tokens: the same rows (as a multiset), no others.
        assert got.shape[0] == len(want) == int(stats.expert_tokens_E[e])
        if want:
            key = lambda t: t[:, 0].argsort()  # noqa: E731
            w = torch.stack(want)
            assert torch.equal(got[key(got)], w[key(w)])
    assert sum(v.shape[0] for v in seen.values()) == int(d.keep_BS.sum())
    if noop or (factor is not None and factor < 1):  # no-ops or a tight slot limit skip slots
        assert int(d.keep_BS.sum()) < d.keep_BS.numel()
    torch.testing.assert_close(stats.computed + stats.dropped + stats.noop, torch.tensor(1.0))
    assert float(stats.load_A.sum()) == pytest.approx(1.0)


def test_dropped_and_noop_tokens_get_exactly_zero_update(make_cfg):
    layer, x_BKD = layer_and_input(make_cfg, noop_experts=2, capacity_factor=0.5, K=21)
    out_BKD, stats = layer(x_BKD)
    logits = x_BKD @ layer.router.weight.T
    d = moe.route(logits, 1, E, stats.slots_per_expert)
    kept_BK = d.keep_BS  # top-1: slot s is token s
    noop_BK = d.expert_BS >= E
    dropped_BK = ~kept_BK & ~noop_BK
    assert noop_BK.any() and dropped_BK.any() and kept_BK.any()   # all three cases occur
    assert torch.equal(out_BKD[~kept_BK], torch.zeros_like(out_BKD[~kept_BK]))
    assert (out_BKD[kept_BK].abs().amax(-1) > 0).all()
    assert float(stats.noop) == pytest.approx(float(noop_BK.float().mean()))
    assert float(stats.dropped) == pytest.approx(float(dropped_BK.float().mean()))


def test_block_passes_dropped_tokens_through_on_the_residual(make_cfg):
    """A block whose MoE drops or no-ops a token adds only the attention update to it."""
    cfg = moe_cfg(make_cfg, noop_experts=2, capacity_factor=0.5)
    block = Block(cfg, layer=0)
    dense_twin = Block(dataclasses.replace(cfg, moe=MoEConfig()), layer=0)
    dense_twin.attn.load_state_dict(block.attn.state_dict())
    with torch.no_grad():
        block.mlp.router.weight.normal_(0.0, 1.0)
        dense_twin.mlp.down.weight.zero_()  # attention only
    x_BTD = torch.randn(2, 19, cfg.d_model)
    rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    out_BTD, stats = block(x_BTD, rotary)
    attn_only_BTD, _ = dense_twin(x_BTD, rotary)
    h = block.mlp_norm(attn_only_BTD)
    d = moe.route(h @ block.mlp.router.weight.T, 1, E, stats.slots_per_expert)
    skipped_BT = ~d.keep_BS
    assert skipped_BT.any() and not skipped_BT.all()
    assert torch.equal(out_BTD[skipped_BT], attn_only_BTD[skipped_BT])
    assert not torch.equal(out_BTD[~skipped_BT], attn_only_BTD[~skipped_BT])


def test_padding_reaches_no_expert(make_cfg):
    layer, x_BKD = layer_and_input(make_cfg, capacity_factor=None)
    valid_BK = torch.ones(x_BKD.shape[:2], dtype=torch.bool)
    valid_BK[0, 9:] = False
    out_BKD, stats = layer(x_BKD, valid_BK)
    assert torch.equal(out_BKD[~valid_BK], torch.zeros_like(out_BKD[~valid_BK]))
    assert int(stats.expert_tokens_E.sum()) == int(valid_BK.sum())
    full_BKD, _ = layer(x_BKD)
    # Same values up to float32 rounding: the expert matmuls run over other row counts.
    torch.testing.assert_close(out_BKD[valid_BK], full_BKD[valid_BK], rtol=1e-5, atol=1e-5)


def test_gradients_reach_router_and_used_experts(make_cfg):
    layer, x_BKD = layer_and_input(make_cfg, top_k=2)
    out_BKD, stats = layer(x_BKD)
    (out_BKD.square().sum() + stats.balance_loss + stats.z_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for e in range(E):
        used = int(stats.expert_tokens_E[e]) > 0
        assert (layer.up.grad[e].abs().sum() > 0) == used
        assert (layer.down.grad[e].abs().sum() > 0) == used


# ---- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("fields,needle", [
    (dict(experts=-1), "moe.experts"),
    (dict(experts=0, noop_experts=2), "noop_experts needs"),
    (dict(experts=2, top_k=3), "top_k must be 1 or 2"),
    (dict(experts=1, top_k=2), "exceeds"),
    (dict(experts=2, capacity_factor=0.0), "capacity_factor"),
    (dict(experts=2, layers="odd"), "moe.layers"),
    (dict(experts=2, balance_loss_weight=-1.0), "balance_loss_weight"),
])
def test_bad_moe_config_names_the_field(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        MoEConfig(**fields)


def test_moe_layer_patterns_and_json_round_trip(make_cfg):
    cfg = make_cfg(routing=dict(), moe=dict(experts=2, layers="routed"))
    assert cfg.moe_layers == cfg.routed_layers == (1, 3)
    assert make_cfg(moe=dict(experts=2, layers="every_other")).moe_layers == (1, 3)
    assert make_cfg(moe=dict(experts=2, layers=[0, 2])).moe_layers == (0, 2)
    assert make_cfg(moe=dict(experts=0)).moe_layers == ()
    with pytest.raises(ConfigError, match="outside"):
        make_cfg(moe=dict(experts=2, layers=[7]))
    again = type(cfg).from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="moe.bogus"):
        type(cfg).from_dict(cfg.to_dict() | {"moe": {"bogus": 1}})


def test_presets_differ_only_where_they_should():
    staged, integrated = presets.get_preset("tiny-mode-staged"), \
        presets.get_preset("tiny-mode-integrated")
    reduced, plain = presets.get_preset("tiny-moe-reduced"), presets.get_preset("tiny-moe")
    assert staged.routed_layers and not integrated.routed_layers and not plain.routed_layers
    assert integrated.moe.noop_experts > 0 and reduced.moe.noop_experts == 0
    # The foil spends the same expected MLP compute as integrated MoDE, by dropping tokens.
    f_int, f_red = flops.forward_flops(integrated), flops.forward_flops(reduced)
    assert f_int.mlp == pytest.approx(f_red.mlp, rel=0.02)
    assert f_red.mlp < flops.forward_flops(plain).mlp
    assert presets.base_preset("small-mode-integrated") == "small"


# ---- the model: causality, statistics, FLOPs, engine, training ---------------------------------

KINDS = {
    "moe_top2": dict(routing=dict(router="none"), moe=dict(experts=E, top_k=2)),
    "staged": dict(routing=dict(capacity=0.5), moe=dict(experts=E)),
    "integrated": dict(routing=dict(router="none"), moe=dict(experts=E, noop_experts=2)),
    "reduced": dict(routing=dict(router="none"), moe=dict(experts=E, capacity_factor=0.5)),
}


def model_for(make_cfg, kind, seed=0):
    torch.manual_seed(seed)
    model = MoDLM(make_cfg(init_std=0.1, tie_embeddings=False, **KINDS[kind])).eval()
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block, "router"):
                block.router.weight.mul_(3.0)
                block.predictor.head.weight.mul_(3.0)
            core = getattr(block, "block", block)
            if isinstance(core.mlp, moe.MoE):
                core.mlp.router.weight.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("kind", list(KINDS))
def test_changing_future_tokens_leaves_past_logits_unchanged(make_cfg, kind):
    model = model_for(make_cfg, kind)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 99, (2, 24), generator=g)
    b = a.clone()
    b[:, 15:] = torch.randint(0, 99, (2, 9), generator=g)
    modes = ["router", "predictor"] if kind == "staged" else ["router", "topk"]
    for mode in modes:  # MoE slots are per sequence in time order: causal even in training
        with torch.no_grad():
            la, lb = model(a, mode=mode).logits_BTV, model(b, mode=mode).logits_BTV
        torch.testing.assert_close(la[:, :15], lb[:, :15], rtol=0, atol=1e-6)
        assert not torch.allclose(la[:, 15:], lb[:, 15:])


@pytest.mark.parametrize("kind", list(KINDS))
def test_model_returns_moe_statistics_and_losses(make_cfg, kind):
    model = model_for(make_cfg, kind).train()
    idx = torch.randint(0, 99, (3, 20))
    out = model(idx, idx)
    assert len(out.moe) == len(model.cfg.moe_layers) == 4
    assert [m.layer for m in out.moe] == list(model.cfg.moe_layers)
    for m in out.moe:
        assert m.load_A.shape == (model.cfg.moe.choices,)
    noop = [float(m.noop) for m in out.moe]
    dropped = [float(m.dropped) for m in out.moe]
    assert (max(noop) > 0) == (kind == "integrated")
    if kind == "reduced":
        assert min(dropped) > 0
    extra = (model.cfg.moe.balance_loss_weight * out.moe_balance_loss
             + model.cfg.moe.z_loss_weight * out.moe_z_loss)
    routed = (out.loss - out.lm_loss - extra).detach()
    if kind == "staged":
        assert len(out.routing) == 2 and float(routed) > 0  # MoD aux + predictor losses too
    else:
        torch.testing.assert_close(routed, torch.tensor(0.0), rtol=0, atol=1e-6)


def count(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_flops_match_counter_given_the_measured_loads(make_cfg, kind):
    model = model_for(make_cfg, kind)
    T = model.cfg.max_seq_len
    idx = torch.randint(0, 99, (1, T))
    with torch.no_grad():
        out = model(idx)
        counted = count(lambda: model(idx))
    cfg = model.cfg
    f = flops.forward_flops(cfg, T)
    n = [T if i not in cfg.routed_layers else
         flops.capacity_k(T, cfg.routing.capacity) for i in cfg.moe_layers]
    expected_mlp = sum(flops.moe_mlp_flops(cfg, flops.expected_expert_tokens(cfg, k)) for k in n)
    actual_mlp = sum(flops.moe_mlp_flops(cfg, int(m.expert_tokens_E.sum())) for m in out.moe)
    assert counted == pytest.approx(f.total - expected_mlp + actual_mlp, rel=1e-9)
    assert f.moe_router == sum(2 * k * cfg.d_model * cfg.moe.choices for k in n)


def test_forward_flops_exact_when_every_expert_fills_its_slots(make_cfg):
    cfg = make_cfg(routing=dict(router="none"), moe=dict(experts=2, capacity_factor=0.2))
    model = MoDLM(cfg).eval()
    idx = torch.randint(0, 99, (1, 30))
    with torch.no_grad():
        out = model(idx)
        counted = count(lambda: model(idx))
    assert all(m.expert_tokens_E.tolist() == [3, 3] for m in out.moe)  # ceil(0.2 * 30 / 2)
    assert counted == pytest.approx(flops.forward_flops(cfg, 30).total, rel=1e-9)


def test_param_count_matches_the_module(make_cfg):
    for kind in KINDS:
        model = model_for(make_cfg, kind)
        assert flops.param_count(model.cfg).total == model.num_parameters()


@pytest.mark.parametrize("kind", ["staged", "integrated", "moe_top2"])
def test_engine_greedy_equals_full_causal_forward(make_cfg, kind):
    model = model_for(make_cfg, kind)
    mode = "predictor" if kind == "staged" else "router"
    engine = Engine(model, mode)
    prompts = [[5, 17, 3, 88, 41, 2, 60], [9, 30], [71, 4, 4, 12, 90, 33, 8, 51]]
    result = engine.generate(prompts, 8)
    for b, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(8):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]), mode=mode).logits_BTV[0, -1].argmax()))
        assert list(result.tokens[b]) == seq[len(prompt):]
    assert len({tuple(t) for t in result.tokens}) > 1


@pytest.mark.parametrize("preset", ["tiny-mode-staged", "tiny-mode-integrated"])
def test_mode_presets_train_through_the_pipeline(tmp_path, preset):
    """12 steps at T 16 (under a second): the loss falls, every step record carries each block's
    MoE statistics, and only integrated MoDE sends tokens to no-op experts."""
    import json

    from modlm.train import configure, train
    corpus = tmp_path / "corpus.txt"
    words = ["the", "router", "picks", "tokens", "and", "experts", "skip", "others"]
    corpus.write_text("\n".join(" ".join(words[(i * j) % 8] for j in range(1, 12))
                                for i in range(300)))
    cfg = configure(preset, {
        "data.corpus": str(corpus), "data.seq_len": 16, "data.cache_dir": str(tmp_path / "c"),
        "model.max_seq_len": 16, "steps": 12, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2,
        "eval_every": 12, "eval_batches": 1, "checkpoint_every": 12, "log_every": 1,
        "device": "cpu", "out_dir": str(tmp_path / "runs"), "run_name": "r"})
    result = train(cfg)
    records = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lm_loss" in r]
    losses = [r["lm_loss"] for r in steps]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    assert all(len(r["moe_dropped"]) == len(r["moe_noop"]) == cfg.model.n_layers for r in steps)
    noop = sum(sum(r["moe_noop"]) for r in steps)
    assert noop > 0 if preset == "tiny-mode-integrated" else noop == 0


def test_evaluation_reports_moe_shares_in_both_forwards(make_cfg):
    import numpy as np

    from modlm.evaluate import available_modes, evaluate
    model = model_for(make_cfg, "reduced")
    assert available_modes(model.cfg) == ("topk", "router")
    ids = np.random.default_rng(0).integers(0, 99, 400).astype(np.uint16)
    res = evaluate(model, ids, n_bytes=400, seq_len=24, batch_size=4, max_batches=2)
    train_fwd, infer_fwd = res["topk"].moe, res["router"].moe
    assert [m.layer for m in train_fwd] == list(model.cfg.moe_layers)
    assert all(m.dropped > 0 for m in train_fwd)           # slot limits apply when training
    assert all(m.dropped == 0 and m.computed == 1 for m in infer_fwd)  # not at inference
    assert res["topk"].loss != res["router"].loss


def test_one_expert_without_a_slot_limit_is_the_dense_mlp(make_cfg):
    """A single expert gets gate softmax([r]) = 1 and every token: the dense MLP exactly."""
    cfg = make_cfg(routing=dict(router="none"), moe=dict(experts=1, capacity_factor=None))
    dense_cfg = dataclasses.replace(cfg, moe=MoEConfig())
    torch.manual_seed(0)
    block, dense_block = Block(cfg, layer=0), Block(dense_cfg, layer=0)
    dense_block.load_state_dict({k: v for k, v in block.state_dict().items()
                                 if not k.startswith("mlp.")}, strict=False)
    with torch.no_grad():
        block.mlp.up[0].copy_(dense_block.mlp.up.weight)
        block.mlp.down[0].copy_(dense_block.mlp.down.weight)
    x_BTD = torch.randn(2, 11, cfg.d_model)
    rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    out, stats = block(x_BTD, rotary)
    ref, _ = dense_block(x_BTD, rotary)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert int(stats.expert_tokens_E.sum()) == 22
