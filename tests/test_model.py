"""The language model (modlm/model.py): outputs, losses, validation, gradients, causality.

Legend: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modlm import flops
from modlm.block import Block, RoutedBlock
from modlm.model import ModelOutput, MoDLM


def tokens(B, T, vocab=99, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- outputs and losses ----------------------------------------------------------------------

def test_output_shapes_and_fields(make_cfg):
    cfg = make_cfg()
    model = MoDLM(cfg)
    idx = tokens(3, 16)
    out = model(idx, tokens(3, 16, seed=1))
    assert isinstance(out, ModelOutput)
    assert out.logits_BTV.shape == (3, 16, 99)
    assert out.logits_BTV.dtype == torch.float32
    for loss in (out.loss, out.lm_loss, out.router_aux_loss, out.predictor_loss):
        assert loss.shape == () and torch.isfinite(loss)
    assert [s.layer for s in out.routing] == [1, 3]
    for s in out.routing:
        assert s.mask_BT.shape == s.weights_BT.shape == (3, 16)
        assert s.router_aux_loss is not None and s.predictor_loss is not None
        assert 0.0 <= s.router_accuracy.item() <= 1.0 and 0.0 <= s.predictor_accuracy.item() <= 1.0
    no_targets = model(idx)
    assert no_targets.loss is None and no_targets.lm_loss is None
    assert no_targets.router_aux_loss is None and no_targets.predictor_loss is None
    assert torch.equal(no_targets.logits_BTV, out.logits_BTV)
    assert len(no_targets.routing) == 2


def test_loss_is_weighted_sum(make_cfg):
    cfg = make_cfg(routing=dict(aux_loss_weight=0.3, predictor_loss_weight=0.7))
    model = MoDLM(cfg)
    idx, tgt = tokens(2, 16), tokens(2, 16, seed=1)
    tgt[0, :3] = -1  # ignored positions
    out = model(idx, tgt)
    assert torch.equal(out.loss, out.lm_loss + 0.3 * out.router_aux_loss + 0.7 * out.predictor_loss)
    keep = tgt.flatten() != -1
    lm = F.cross_entropy(out.logits_BTV.flatten(0, 1)[keep], tgt.flatten()[keep])
    torch.testing.assert_close(out.lm_loss, lm, rtol=0, atol=1e-6)
    aux = torch.stack([s.router_aux_loss for s in out.routing]).mean()
    pred = torch.stack([s.predictor_loss for s in out.routing]).mean()
    assert torch.equal(out.router_aux_loss, aux) and torch.equal(out.predictor_loss, pred)
    # Router BCE against top-k membership, by hand from the weights sigmoid(r) and the mask.
    for s in out.routing:
        bce = F.binary_cross_entropy(s.weights_BT, s.mask_BT.float())
        torch.testing.assert_close(s.router_aux_loss, bce, rtol=0, atol=1e-5)
    assert out.loss.item() != out.lm_loss.item()


@pytest.mark.parametrize("routing_kw", [dict(router="none"), dict(layers="none"), dict(layers=())])
def test_dense_config_has_no_routing(make_cfg, routing_kw):
    cfg = make_cfg(routing=routing_kw)
    assert cfg.is_dense and cfg.routed_layers == ()
    model = MoDLM(cfg)
    assert not any(isinstance(b, RoutedBlock) for b in model.blocks)
    out = model(tokens(2, 7), tokens(2, 7, seed=1))
    assert out.routing == ()
    assert out.router_aux_loss is None and out.predictor_loss is None
    assert torch.equal(out.loss, out.lm_loss)


@pytest.mark.parametrize("routing_kw, n_layers, expected", [
    (dict(layers="every_other"), 6, (1, 3, 5)),
    (dict(layers="every_other", first_layer_dense=False), 6, (0, 2, 4)),
    (dict(layers="all"), 6, (1, 2, 3, 4, 5)),
    (dict(layers="all", first_layer_dense=False), 5, (0, 1, 2, 3, 4)),
    (dict(layers=(4, 2)), 6, (2, 4)),
])
def test_routed_layer_placement(make_cfg, routing_kw, n_layers, expected):
    cfg = make_cfg(n_layers=n_layers, routing=routing_kw)
    assert cfg.routed_layers == expected
    model = MoDLM(cfg)
    routed = tuple(i for i, b in enumerate(model.blocks) if isinstance(b, RoutedBlock))
    assert routed == expected
    assert all(isinstance(b, Block) for i, b in enumerate(model.blocks) if i not in expected)
    assert tuple(s.layer for s in model(tokens(1, 16)).routing) == expected


@pytest.mark.parametrize("make_input, mode, predictor, match", [
    (lambda: tokens(2, 7), "causal", True, "routing mode must be one of"),
    (lambda: tokens(2, 7), "predictor", False, "routing.predictor=true"),
    (lambda: torch.full((2, 7), 99), "topk", True, r"0\.\.98"),
    (lambda: torch.full((2, 7), -1), "topk", True, r"-1\.\.-1"),
    (lambda: tokens(1, 33), "topk", True, "max_seq_len=32"),
    (lambda: tokens(1, 7)[0], "topk", True, r"\(batch, time\)"),
    (lambda: tokens(1, 7).float(), "topk", True, "int64"),
])
def test_input_validation(make_cfg, make_input, mode, predictor, match):
    cfg = make_cfg(routing=dict(predictor=predictor))
    model = MoDLM(cfg)
    with pytest.raises(ValueError, match=match):
        model(make_input(), mode=mode)


def test_int32_tokens_and_targets_match_int64(make_cfg):
    """int32 ids are accepted by validation, so int32 targets (same tokens) must work too."""
    model = MoDLM(make_cfg())
    idx, tgt = tokens(2, 16), tokens(2, 16, seed=1)
    ref = model(idx, tgt)
    out = model(idx.int(), tgt.int())
    assert torch.equal(out.logits_BTV, ref.logits_BTV)
    assert torch.equal(out.loss, ref.loss)


def test_predictor_mode_without_predictor_is_fine_for_router_mode(make_cfg):
    model = MoDLM(make_cfg(routing=dict(predictor=False)))
    assert model(tokens(1, 7), mode="router").logits_BTV.shape == (1, 7, 99)


def test_same_seed_same_model_and_losses(make_cfg):
    cfg = make_cfg()
    idx, tgt = tokens(2, 16), tokens(2, 16, seed=1)

    def build(seed):
        torch.manual_seed(seed)
        m = MoDLM(cfg)
        return m, m(idx, tgt)

    (m1, o1), (m2, o2), (m3, o3) = build(5), build(5), build(6)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    for a, b in [(o1.loss, o2.loss), (o1.lm_loss, o2.lm_loss),
                 (o1.router_aux_loss, o2.router_aux_loss), (o1.predictor_loss, o2.predictor_loss)]:
        assert torch.equal(a, b)
    assert not torch.equal(s1["embed.weight"], s3["embed.weight"])
    assert o1.loss.item() != o3.loss.item()


def test_tied_embeddings_share_storage(make_cfg):
    tied = MoDLM(make_cfg())
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = MoDLM(make_cfg(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert untied.num_parameters() == tied.num_parameters() + 99 * 32


@pytest.mark.parametrize("overrides", [
    dict(routing=dict(router="none")),
    dict(),
    dict(routing=dict(layers="all", predictor_hidden=5)),
    dict(tie_embeddings=False),
    dict(mlp="gelu", d_mlp=None),
    dict(d_model=48, n_heads=3, routing=dict(predictor=False)),
    dict(routing=dict(router="random", predictor=False, aux_loss_weight=0.0)),
])
def test_num_parameters_matches_flops_param_count(make_cfg, overrides):
    cfg = make_cfg(**overrides)
    model = MoDLM(cfg)
    counted = flops.param_count(cfg)
    assert model.num_parameters() == counted.total
    assert counted.total == counted.embedding + counted.non_embedding
    # Against a hand count of the default tiny config, so a shared mistake cannot hide.
    if not overrides:
        D, F_, V, P = 32, 37, 99, 4
        block = 4 * D * D + 3 * D * F_ + 2 * D
        assert counted.total == V * D + 4 * block + 2 * (D + D * P + P) + D


# ---- gradients -------------------------------------------------------------------------------

def routers(model):
    return [b.router.weight for b in model.blocks if isinstance(b, RoutedBlock)]


def test_router_gets_gradient_from_lm_loss(make_cfg):
    model = MoDLM(make_cfg())
    out = model(tokens(2, 16), tokens(2, 16, seed=1))
    out.lm_loss.backward()
    for w in routers(model):
        assert w.grad is not None and w.grad.abs().sum() > 0


def test_constant_weight_router_gets_no_lm_gradient(make_cfg):
    model = MoDLM(make_cfg(routing=dict(router_weight="constant")))
    out = model(tokens(2, 16), tokens(2, 16, seed=1))
    out.lm_loss.backward()
    for w in routers(model):
        assert w.grad is None or not w.grad.any()
    assert model.embed.weight.grad.abs().sum() > 0  # the trunk did learn


def test_aux_loss_reaches_router(make_cfg):
    model = MoDLM(make_cfg(routing=dict(router_weight="constant")))
    out = model(tokens(2, 16), tokens(2, 16, seed=1))
    out.router_aux_loss.backward()
    for w in routers(model):
        assert w.grad is not None and w.grad.abs().sum() > 0


def test_predictor_loss_touches_only_the_predictor(make_cfg):
    model_on = MoDLM(make_cfg(routing=dict(predictor_loss_weight=1.0)))
    model_off = MoDLM(make_cfg(routing=dict(predictor_loss_weight=0.0)))
    model_off.load_state_dict(model_on.state_dict())
    idx, tgt = tokens(2, 16), tokens(2, 16, seed=1)
    out_on, out_off = model_on(idx, tgt), model_off(idx, tgt)
    assert out_on.loss.item() != out_off.loss.item()  # the weight changed the objective
    out_on.loss.backward()
    out_off.loss.backward()
    grads_on = dict(model_on.named_parameters())
    grads_off = dict(model_off.named_parameters())
    checked = 0
    for name, p in grads_on.items():
        if ".predictor." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0
            continue
        assert torch.equal(p.grad, grads_off[name].grad), name
        checked += 1
    assert checked > 10
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers(model_on))


# ---- causality -------------------------------------------------------------------------------

def causal_model(make_cfg, **routing_kw):
    cfg = make_cfg(routing=dict(capacity=0.5, **routing_kw))
    model = MoDLM(cfg)
    with torch.no_grad():
        for b in model.blocks:
            if isinstance(b, RoutedBlock):
                # Router logits of either sign (about half routed in "router" mode) and a
                # predictor with decisive, token-dependent logits.
                b.router.weight.normal_(0.0, 1.0)
                if b.predictor is not None:
                    b.predictor.fc.weight.normal_(0.0, 1.0)
                    b.predictor.head.weight.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("mode", ["router", "predictor"])
def test_causal_modes_do_not_see_the_future(make_cfg, mode):
    model = causal_model(make_cfg)
    T = 16
    idx = tokens(2, T)
    base = model(idx, mode=mode)
    for s in base.routing:
        assert 0.0 < s.fraction.item() < 1.0
    for t in (0, 3, 8, 14):
        changed = idx.clone()
        changed[:, t + 1:] = (idx[:, t + 1:] + 1 + tokens(2, T - t - 1, vocab=97, seed=t)) % 99
        assert (changed[:, t + 1:] != idx[:, t + 1:]).all()
        out = model(changed, mode=mode)
        torch.testing.assert_close(out.logits_BTV[:, :t + 1], base.logits_BTV[:, :t + 1],
                                   rtol=0, atol=1e-5)
        for s0, s1 in zip(base.routing, out.routing):
            assert torch.equal(s0.mask_BT[:, :t + 1], s1.mask_BT[:, :t + 1])
        assert not torch.allclose(out.logits_BTV[:, t + 1:], base.logits_BTV[:, t + 1:])


def test_topk_mode_leaks_the_future(make_cfg):
    """Documented non-causality: a later high-score token pushes an earlier one out of top-k."""
    cfg = make_cfg(routing=dict(layers=(0,), first_layer_dense=False, capacity=0.25))
    model = MoDLM(cfg)
    with torch.no_grad():
        model.embed.weight[:, 0] = torch.arange(99) / 10.0  # router score = token id / 10
        model.blocks[0].router.weight.zero_()
        model.blocks[0].router.weight[0] = 1.0
    idx = torch.tensor([[10, 50, 3, 60, 7, 5, 1, 2]])   # k = 2: positions 1 and 3 routed
    future = idx.clone()
    future[0, 6] = 90                                     # now positions 3 and 6: 1 drops out
    out, out_future = model(idx), model(future)
    assert out.routing[0].mask_BT[0].nonzero().flatten().tolist() == [1, 3]
    assert out_future.routing[0].mask_BT[0].nonzero().flatten().tolist() == [3, 6]
    # Position 0 is unaffected (not routed either way, attends only to itself) ...
    torch.testing.assert_close(out.logits_BTV[:, 0], out_future.logits_BTV[:, 0], rtol=0, atol=1e-6)
    # ... but position 1's logits changed because of a token five steps later.
    assert not torch.allclose(out.logits_BTV[:, 1], out_future.logits_BTV[:, 1], atol=1e-4)
    # The causal router mode does not leak on the same inputs.
    r, r_future = model(idx, mode="router"), model(future, mode="router")
    torch.testing.assert_close(r.logits_BTV[:, :6], r_future.logits_BTV[:, :6], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["router", "predictor"])
def test_batch_rows_with_different_counts_match_running_alone(make_cfg, mode):
    model = causal_model(make_cfg)
    idx = tokens(4, 16, seed=7)
    out = model(idx, mode=mode)
    counts = torch.stack([s.mask_BT.sum(dim=1) for s in out.routing])  # (layers, B)
    assert any(len(set(c.tolist())) > 1 for c in counts), counts
    for b in range(4):
        alone = model(idx[b:b + 1], mode=mode)
        torch.testing.assert_close(out.logits_BTV[b:b + 1], alone.logits_BTV, rtol=0, atol=1e-5)
        for s_batch, s_alone in zip(out.routing, alone.routing):
            assert torch.equal(s_batch.mask_BT[b:b + 1], s_alone.mask_BT)


@pytest.mark.parametrize("moe", [None, dict(experts=3, noop_experts=1)])
def test_model_cast_to_bfloat16_runs_every_mode(make_cfg, moe):
    """Router, predictor and MoE router compute in float32 even when the weights are bf16."""
    cfg = make_cfg(**({"moe": moe} if moe else {}))
    model = MoDLM(cfg).to(torch.bfloat16)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    for mode in ("topk", "router", "predictor"):
        out = model(idx, idx, mode=mode)
        assert out.logits_BTV.dtype == torch.bfloat16 and torch.isfinite(out.loss)
        assert all(s.predictor_accuracy.dtype == torch.float32 for s in out.routing)
