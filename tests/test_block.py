"""The dense block and the routed (MoD) block (modlm/block.py, paper Sec 3.4, Eq. 1).

Legend: B batch, T time, D width, K routed tokens, H heads, Dh head width.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modlm import routing
from modlm.block import Block, RoutedBlock
from modlm.layers import Rotary
from modlm.model import MoDLM


def rotary_for(cfg):
    return Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)


def randomize_(module, std=0.2):
    """Weights large enough that every update is clearly non-zero."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return module


def update_at(core, x_BKD, rotary, positions):
    """The dense block's f on the given tokens, with modlm's rotary table at `positions`."""
    rot = rotary(positions)
    return core.update(x_BKD, *(rot if isinstance(rot, tuple) else (rot,)))[0]


def own_rotate(x_THd, positions_T, theta):
    """Rotary written here, not by modlm, in the layout layers.Rotary documents: pairs
    (x[2i], x[2i+1]) rotate by position * theta^(-2i / Dh). x (T, H, Dh), positions (T,)."""
    Dh = x_THd.shape[-1]
    inv_freq = theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    angles_TR = positions_T.to(torch.float64)[:, None] * inv_freq
    cos, sin = angles_TR.cos().float()[:, None, :], angles_TR.sin().float()[:, None, :]
    even, odd = x_THd[..., 0::2], x_THd[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


# ---- exactly k tokens ------------------------------------------------------------------------

@pytest.mark.parametrize("T", [7, 16, 24])
@pytest.mark.parametrize("capacity", [0.125, 0.5])
def test_topk_routes_exactly_k_per_row(make_cfg, T, capacity):
    cfg = make_cfg(routing=dict(capacity=capacity))
    model = MoDLM(cfg)
    idx_BT = torch.randint(0, cfg.vocab_size, (3, T))
    out = model(idx_BT)
    k = routing.capacity_k(T, capacity)
    assert [s.layer for s in out.routing] == [1, 3]
    for stats in out.routing:
        assert stats.k == k
        assert stats.mask_BT.shape == (3, T)
        assert torch.equal(stats.mask_BT.sum(dim=1), torch.full((3,), k))
        assert stats.fraction.item() == pytest.approx(k / T)
    # The knob changes something: the model built with the other capacity routes a different
    # number of tokens per row.
    other_cfg = make_cfg(routing=dict(capacity=0.5 if capacity == 0.125 else 0.125))
    other = MoDLM(other_cfg)(idx_BT).routing[0].mask_BT.sum(dim=1)
    assert not torch.equal(other, torch.full((3,), k))


# ---- residual exactness ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["topk", "router", "predictor"])
@pytest.mark.parametrize("weighting", ["sigmoid", "raw", "constant"])
def test_zero_update_returns_input_exactly(make_cfg, mode, weighting):
    cfg = make_cfg(routing=dict(capacity=0.5, router_weight=weighting))
    block = randomize_(RoutedBlock(cfg, layer=1))
    x_BTD = torch.randn(2, 16, cfg.d_model)
    out_before, stats = block(x_BTD, rotary_for(cfg), mode)
    assert stats.mask_BT.any()
    assert not torch.equal(out_before, x_BTD)  # the update is non-zero before zeroing
    with torch.no_grad():
        block.block.attn.out.weight.zero_()
        block.block.mlp.down.weight.zero_()
    out, stats = block(x_BTD, rotary_for(cfg), mode)
    assert stats.mask_BT.any()
    assert torch.equal(out, x_BTD)


def test_zero_update_dense_block_returns_input_exactly(make_cfg):
    cfg = make_cfg()
    block = randomize_(Block(cfg))
    with torch.no_grad():
        block.attn.out.weight.zero_()
        block.mlp.down.weight.zero_()
    x_BTD = torch.randn(2, 16, cfg.d_model)
    assert torch.equal(block(x_BTD, rotary_for(cfg))[0], x_BTD)


@pytest.mark.parametrize("mode", ["topk", "router", "predictor"])
def test_unselected_rows_bit_identical(make_cfg, mode):
    cfg = make_cfg(routing=dict(capacity=0.25))
    block = randomize_(RoutedBlock(cfg, layer=1))
    x_BTD = torch.randn(3, 24, cfg.d_model)
    x_BTD[0, :, 0] = -0.0  # signed zeros must survive in unrouted rows
    out, stats = block(x_BTD, rotary_for(cfg), mode)
    mask = stats.mask_BT
    assert mask.any() and not mask.all()
    assert torch.equal(out[~mask], x_BTD[~mask])
    assert torch.equal(torch.signbit(out[~mask]), torch.signbit(x_BTD[~mask]))
    # Every selected token was changed.
    assert ((out[mask] - x_BTD[mask]).abs().amax(dim=-1) > 0).all()


# ---- capacity 1.0 equals dense ---------------------------------------------------------------

def test_capacity_one_constant_weight_equals_dense_block(make_cfg):
    cfg = make_cfg(routing=dict(capacity=1.0, router_weight="constant"))
    routed = randomize_(RoutedBlock(cfg, layer=1))
    dense = Block(cfg)
    dense.load_state_dict(routed.block.state_dict())
    x_BTD = torch.randn(2, 16, cfg.d_model)
    rotary = rotary_for(cfg)
    out_routed, stats = routed(x_BTD, rotary, "topk")
    assert stats.mask_BT.all()
    out_dense, _ = dense(x_BTD, rotary)
    torch.testing.assert_close(out_routed, out_dense, rtol=0, atol=1e-6)
    assert not torch.allclose(out_dense, x_BTD)
    # With the default sigmoid weight the same weights give a different output.
    sig_cfg = make_cfg(routing=dict(capacity=1.0))
    sig = RoutedBlock(sig_cfg, layer=1)
    sig.load_state_dict(routed.state_dict())
    assert not torch.allclose(sig(x_BTD, rotary)[0], out_dense, atol=1e-4)


def test_capacity_one_constant_weight_model_equals_dense_model(make_cfg):
    mod_cfg = make_cfg(routing=dict(capacity=1.0, router_weight="constant", layers="all",
                                    first_layer_dense=False, predictor=False,
                                    aux_loss_weight=0.0))
    dense_cfg = make_cfg(routing=dict(router="none"))
    mod, dense = MoDLM(mod_cfg), MoDLM(dense_cfg)
    state = {k.replace(".block.", "."): v for k, v in mod.state_dict().items()
             if ".router." not in k}
    dense.load_state_dict(state)
    idx_BT = torch.randint(0, 99, (2, 16))
    out_mod, out_dense = mod(idx_BT, idx_BT), dense(idx_BT, idx_BT)
    assert len(out_mod.routing) == 4 and out_dense.routing == ()
    torch.testing.assert_close(out_mod.logits_BTV, out_dense.logits_BTV, rtol=0, atol=1e-5)


# ---- attention among the selected tokens, at their true positions ---------------------------

def manual_update_full(block, x_TD, sel_T, theta):
    """f of the paper for selected tokens, written from scratch over the full sequence: queries
    from every position, keys restricted to selected tokens at or before the query, rotary at
    absolute positions. Rows of unselected tokens are meaningless and ignored by the caller."""
    T, D = x_TD.shape
    attn, mlp = block.attn, block.mlp
    H = attn.n_heads
    Dh = D // H

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    q, k, v = (norm(x_TD, block.attn_norm.weight) @ attn.qkv.weight.T).view(T, 3, H, Dh).unbind(1)
    q, k = own_rotate(q, torch.arange(T), theta), own_rotate(k, torch.arange(T), theta)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(Dh)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)) & sel_T[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key are unused
    a_TD = torch.einsum("hij,jhd->ihd", probs, v).reshape(T, D) @ attn.out.weight.T
    h = norm(x_TD + a_TD, block.mlp_norm.weight)
    gate, up = (h @ mlp.up.weight.T).chunk(2, dim=-1)
    return a_TD + (F.silu(gate) * up) @ mlp.down.weight.T


@pytest.mark.parametrize("mode", ["topk", "router"])
def test_routed_attention_matches_reference(make_cfg, mode):
    cfg = make_cfg(d_model=48, n_heads=3, routing=dict(capacity=0.25))
    block = randomize_(RoutedBlock(cfg, layer=1))
    with torch.no_grad():
        block.router.weight.normal_(0.0, 1.0)
    x_BTD = torch.randn(3, 24, cfg.d_model)
    rotary = rotary_for(cfg)
    out, stats = block(x_BTD, rotary, mode)
    mask = stats.mask_BT
    counts = mask.sum(dim=1)
    assert (counts > 1).all() and (counts < 24).all()
    for b in range(3):
        pos = mask[b].nonzero().squeeze(-1)
        assert (pos.diff() > 0).all()
        xs_KD = x_BTD[b, pos]
        r_K = xs_KD @ block.router.weight
        w_K = torch.sigmoid(r_K)
        # Reference 1: the dense block's update on the gathered subsequence, rotary at the
        # original positions.
        delta = update_at(block.block, xs_KD[None], rotary, pos[None])[0]
        torch.testing.assert_close(out[b, pos], xs_KD + w_K[:, None] * delta, rtol=0, atol=1e-5)
        # Reference 2: attention written out by hand over the whole row with masked keys.
        full = manual_update_full(block.block, x_BTD[b], mask[b], cfg.rope_theta)
        torch.testing.assert_close(out[b, pos], xs_KD + w_K[:, None] * full[pos],
                                   rtol=0, atol=1e-5)
        # Positions matter: renumbering the gathered tokens 0..K-1 gives a different answer.
        wrong = update_at(block.block, xs_KD[None], rotary, torch.arange(len(pos))[None])[0]
        if not torch.equal(pos, torch.arange(len(pos))):
            assert not torch.allclose(xs_KD + w_K[:, None] * wrong, out[b, pos], atol=1e-4)


# ---- random router ---------------------------------------------------------------------------

def test_random_router_follows_the_generator(make_cfg):
    cfg = make_cfg(routing=dict(router="random", predictor=False, aux_loss_weight=0.0,
                                capacity=0.25))
    block = randomize_(RoutedBlock(cfg, layer=1))
    assert not list(block.router.parameters())
    x_BTD = torch.randn(2, 24, cfg.d_model)
    rotary = rotary_for(cfg)

    def run(seed):
        return block(x_BTD, rotary, "topk", torch.Generator().manual_seed(seed))

    out1, s1 = run(1)
    out1b, s1b = run(1)
    out2, s2 = run(2)
    assert torch.equal(s1.mask_BT, s1b.mask_BT) and torch.equal(out1, out1b)
    assert not torch.equal(s1.mask_BT, s2.mask_BT)
    assert not torch.equal(out1, out2)
    for s in (s1, s2):
        assert torch.equal(s.mask_BT.sum(1), torch.full((2,), 6))
        assert s.router_aux_loss is None and s.predictor_loss is None
        assert torch.equal(s.weights_BT, torch.ones(2, 24))  # random scores weight nothing


# ---- router weighting ------------------------------------------------------------------------

def test_router_weight_modes_differ(make_cfg):
    x_BTD = torch.randn(2, 16, 32)
    rotary = None
    results = {}
    state = None
    for weighting in ("sigmoid", "raw", "constant"):
        cfg = make_cfg(routing=dict(capacity=0.5, router_weight=weighting))
        rotary = rotary or rotary_for(cfg)
        block = RoutedBlock(cfg, layer=1)
        if state is None:
            randomize_(block)
            state = block.state_dict()
        block.load_state_dict(state)
        out, stats = block(x_BTD, rotary, "topk")
        r_BT = x_BTD @ block.router.weight
        w_BT = {"sigmoid": torch.sigmoid(r_BT), "raw": r_BT, "constant": torch.ones_like(r_BT)}
        torch.testing.assert_close(stats.weights_BT, w_BT[weighting], rtol=0, atol=1e-6)
        idx_BK = routing.topk_in_time_order(r_BT, 8)
        x_BKD = routing.gather_tokens(x_BTD, idx_BK)
        delta = update_at(block.block, x_BKD, rotary, idx_BK)
        expected = x_BKD + w_BT[weighting].gather(1, idx_BK)[..., None] * delta
        torch.testing.assert_close(routing.gather_tokens(out, idx_BK), expected, rtol=0, atol=1e-5)
        results[weighting] = (out, stats.mask_BT)
    masks = [m for _, m in results.values()]
    assert all(torch.equal(masks[0], m) for m in masks)  # the weighting never changes selection
    names = list(results)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(results[names[i]][0], results[names[j]][0], atol=1e-4)


# ---- causal decisions ------------------------------------------------------------------------

def test_causal_decisions_follow_their_rules(make_cfg):
    """"router": routed iff sigmoid(r) > 0.5, i.e. r > 0; "predictor": iff its logit > 0;
    the random control: iff its score passes the (1 - capacity) Gaussian quantile."""
    cfg = make_cfg(routing=dict(capacity=0.25))
    block = randomize_(RoutedBlock(cfg, layer=1), std=0.5)
    x_BTD = torch.randn(3, 24, cfg.d_model)
    rotary = rotary_for(cfg)
    r_BT = x_BTD @ block.router.weight
    assert (r_BT > 0).any() and (r_BT < 0).any()
    _, stats = block(x_BTD, rotary, "router")
    assert torch.equal(stats.mask_BT, r_BT > 0)
    pred_BT = block.predictor(x_BTD)
    assert (pred_BT > 0).any() and (pred_BT < 0).any()
    _, stats = block(x_BTD, rotary, "predictor")
    assert torch.equal(stats.mask_BT, pred_BT > 0)
    # Causal counts differ from k (the point of the causal modes).
    assert not torch.equal(stats.mask_BT.sum(1), torch.full((3,), 6))

    rnd_cfg = make_cfg(routing=dict(router="random", predictor=False, aux_loss_weight=0.0,
                                    capacity=0.25))
    rnd = RoutedBlock(rnd_cfg, layer=1)
    scores = torch.randn(3, 24, generator=torch.Generator().manual_seed(4))
    _, stats = rnd(x_BTD, rotary, "router", torch.Generator().manual_seed(4))
    assert torch.equal(stats.mask_BT, scores > 0.6744897501960817)  # N(0,1) 75% quantile


def test_rotary_compiled_form_equals_eager_complex_form(monkeypatch):
    """The real-valued form used under torch.compile is the same rotation as the complex one."""
    from modlm.layers import Rotary, apply_rotary
    rotary = Rotary(head_dim=6, max_seq_len=40, theta=10000.0)
    x = torch.randn(2, 5, 2, 3, 6)
    pos = torch.tensor([[0, 3, 9, 17, 39], [1, 2, 4, 8, 16]])
    eager = apply_rotary(x, rotary(pos))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_form = apply_rotary(x, rotary(pos))
    assert not torch.equal(eager, x)
    torch.testing.assert_close(compiled_form, eager, rtol=1e-6, atol=1e-6)
