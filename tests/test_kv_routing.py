"""Queries and keys/values routed apart (`routing.kv_capacity`; modlm/block.py `decoupled_update`,
the paper's Sec 5 future work): a routed block's queries are the top-k of its router scores, its
keys and values the top-k_kv of the same scores.

Legend: B batch, T time, D width, K queries per row, S key/value tokens per row.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from support import teacher_forced
from test_block import randomize_, rotary_for
from test_flops import count, rel_close
from torch import nn

from modlm import flops, routing
from modlm.block import RoutedBlock, causal_update, decoupled_update
from modlm.config import ConfigError, ModelConfig, RoutingConfig
from modlm.generate import Engine, GenerationError
from modlm.model import MoDLM

CAUSAL = ["router", "predictor"]


def kv_cfg(make_cfg, capacity=0.25, kv_capacity=0.5, **routing_kw):
    return make_cfg(routing=dict(capacity=capacity, kv_capacity=kv_capacity, **routing_kw))


def varied_(model: MoDLM) -> MoDLM:
    """Routers, predictors and key/value offsets scaled so that in every causal mode some tokens
    are queries, some keys/values only, and some neither (b_kv about the size of r)."""
    offset = 2.0 * model.cfg.init_std
    with torch.no_grad():
        for i in model.cfg.routed_layers:
            block = model.blocks[i]
            block.router.weight.mul_(3.0)
            if block.kv_offset is not None:
                block.kv_offset.fill_(offset)
            if block.predictor is not None:
                block.predictor.head.weight.mul_(3.0)
                block.predictor.head.weight[1].add_(0.3 * block.predictor.head.weight[0])
    return model


class FixedRouter(nn.Module):
    """Router logits given by hand (the same for every row), so the sets are known."""

    def __init__(self, scores_T: torch.Tensor) -> None:
        super().__init__()
        self.scores_T = scores_T

    def causal_threshold(self, capacity: float) -> float:
        return 0.0

    def forward(self, x_BTD, generator=None):
        return self.scores_T.expand(x_BTD.shape[0], -1).clone()


def fixed_block(make_cfg, scores_T, kv_capacity=0.5, capacity=0.25):
    """A randomized routed block whose router gives `scores_T`."""
    cfg = kv_cfg(make_cfg, capacity, kv_capacity, predictor=False)
    block = randomize_(RoutedBlock(cfg, 1))
    block.router = FixedRouter(scores_T)
    return cfg, block


# ---- the sets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [7, 16])
def test_topk_routes_k_queries_within_k_kv_keys(make_cfg, T):
    cfg = kv_cfg(make_cfg, 0.25, 0.6)
    out = MoDLM(cfg)(torch.randint(0, cfg.vocab_size, (3, T)))
    k, k_kv = routing.capacity_k(T, 0.25), routing.capacity_k(T, 0.6)
    assert k < k_kv
    for stats in out.routing:
        assert torch.equal(stats.mask_BT.sum(dim=1), torch.full((3,), k))
        assert torch.equal(stats.kv_mask_BT.sum(dim=1), torch.full((3,), k_kv))
        assert not (stats.mask_BT & ~stats.kv_mask_BT).any()            # Q within KV
        assert stats.kv_fraction.item() == pytest.approx(k_kv / T)
    plain = MoDLM(make_cfg(routing=dict(capacity=0.25)))(torch.randint(0, 99, (3, T)))
    assert all(s.kv_mask_BT is None and s.kv_fraction is None for s in plain.routing)


@pytest.mark.parametrize("mode", CAUSAL)
def test_causal_modes_keep_queries_within_keys_and_values(make_cfg, mode):
    cfg = kv_cfg(make_cfg)
    model = varied_(MoDLM(cfg))
    out = model(torch.randint(0, cfg.vocab_size, (3, 24)), mode=mode)
    kv_only = neither = 0
    for stats in out.routing:
        assert not (stats.mask_BT & ~stats.kv_mask_BT).any()
        kv_only += int((stats.kv_mask_BT & ~stats.mask_BT).sum())
        neither += int((~stats.kv_mask_BT).sum())
    assert kv_only > 0 and neither > 0                      # the rules really differ


def test_kv_capacity_equal_to_capacity_is_the_papers_block(make_cfg):
    """kv_capacity == capacity: the same parameters and bit-identical outputs as no
    kv_capacity, in every mode."""
    idx = torch.randint(0, 99, (2, 16))
    plain_cfg = make_cfg(routing=dict(capacity=0.25))
    torch.manual_seed(1)
    plain = MoDLM(plain_cfg)
    torch.manual_seed(1)
    same = MoDLM(kv_cfg(make_cfg, 0.25, 0.25))
    assert plain.state_dict().keys() == same.state_dict().keys()
    for mode in ("topk", *CAUSAL):
        a, b = plain(idx, idx, mode=mode), same(idx, idx, mode=mode)
        assert torch.equal(a.logits_BTV, b.logits_BTV) and torch.equal(a.loss, b.loss)
    assert flops.forward_flops(same.cfg, 16) == flops.forward_flops(plain_cfg, 16)
    torch.manual_seed(1)      # the knob changes something once it exceeds the capacity
    wider = MoDLM(kv_cfg(make_cfg, 0.25, 0.5))
    assert not torch.equal(wider(idx).logits_BTV, plain(idx).logits_BTV)


def test_decoupled_update_with_equal_sets_is_the_coupled_update(make_cfg):
    """The masked attention over a separate key/value set, given the query set itself, computes
    the coupled block's update (to rounding: another attention kernel)."""
    cfg, block = fixed_block(make_cfg, torch.randn(16))
    rotary = rotary_for(cfg)
    x_BTD = torch.randn(2, 16, cfg.d_model)
    mask_BT = torch.rand(2, 16) < 0.5
    mask_BT[:, 0] = True
    sel = routing.Selection.from_mask(mask_BT)
    pos_BT = torch.arange(16).expand(2, 16)
    w_NK = torch.rand(sel.idx_NK.shape)
    decoupled = decoupled_update(block.inner, x_BTD, sel, mask_BT, pos_BT, rotary, w_NK)[0]
    coupled = routing.routed_update(
        x_BTD, sel, w_NK,
        lambda x_NKD: causal_update(block.inner, x_NKD, rotary(sel.gather(pos_BT)),
                                    sel.valid_NK)[:2])[0]
    torch.testing.assert_close(decoupled, coupled, atol=1e-6, rtol=0)
    assert not torch.equal(decoupled, x_BTD)


# ---- what the block computes ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["topk", *CAUSAL])
def test_tokens_outside_the_queries_are_unchanged_bit_for_bit(make_cfg, mode):
    cfg = kv_cfg(make_cfg)
    block = randomize_(RoutedBlock(cfg, 1))
    with torch.no_grad():
        block.kv_offset.fill_(0.5)
    x_BTD = torch.randn(3, 16, cfg.d_model)
    out_BTD, stats = block(x_BTD, rotary_for(cfg), mode)
    q_BT = stats.mask_BT
    assert torch.equal(out_BTD[~q_BT], x_BTD[~q_BT])
    assert (stats.kv_mask_BT & ~q_BT).any()                     # key/value-only tokens too
    assert (out_BTD[q_BT] != x_BTD[q_BT]).all(dim=-1).all()


def test_a_key_value_only_token_feeds_later_queries_and_others_do_not(make_cfg):
    """Scores put queries at 3, 9 and 11 (T = 12, k = 3) and keys/values only at 1, 5 and 7
    (k_kv = 6). Changing token 1 (key/value only) changes every later query's output; changing
    token 2 (neither) changes no other token's output."""
    scores_T = torch.zeros(12)
    scores_T[[3, 9, 11]] = 3.0
    scores_T[[1, 5, 7]] = 2.0
    cfg, block = fixed_block(make_cfg, scores_T)
    rotary = rotary_for(cfg)
    x_BTD = torch.randn(1, 12, cfg.d_model)
    out_BTD, stats = block(x_BTD, rotary)
    assert stats.mask_BT[0].nonzero().view(-1).tolist() == [3, 9, 11]
    assert stats.kv_mask_BT[0].nonzero().view(-1).tolist() == [1, 3, 5, 7, 9, 11]

    def changed_at(t):
        x2 = x_BTD.clone()
        x2[0, t] += 1.0
        out2 = block(x2, rotary)[0]
        return [s for s in range(12) if s != t and not torch.equal(out2[0, s], out_BTD[0, s])]

    assert changed_at(1) == [3, 9, 11]          # every later query sees the key/value token
    assert changed_at(9) == [11]                # a query: the later query
    assert changed_at(2) == []                  # neither a query nor a key/value: no one sees it
    # The knob: the paper's block (keys and values from the queries) ignores token 1.
    _, paper = fixed_block(make_cfg, scores_T, kv_capacity=None)
    paper.load_state_dict(block.state_dict(), strict=False)      # all but b_kv
    x2 = x_BTD.clone()
    x2[0, 1] += 1.0
    assert torch.equal(paper(x2, rotary)[0][0, 3], paper(x_BTD, rotary)[0][0, 3])


def test_gradients_reach_router_offset_and_keys_of_kv_only_tokens(make_cfg):
    cfg = kv_cfg(make_cfg)
    model = MoDLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    model(idx, idx).loss.backward()
    for i in cfg.routed_layers:
        block = model.blocks[i]
        assert block.router.weight.grad.abs().sum() > 0
        assert block.kv_offset.grad is not None and block.kv_offset.grad != 0
        assert block.predictor.head.weight.grad[1].abs().sum() > 0     # the key/value head

    # The queries' updates depend on the key/value-only tokens (through k, v projections) and
    # on no token outside KV.
    block = randomize_(RoutedBlock(cfg, 1))
    x_BTD = torch.randn(2, 16, cfg.d_model, requires_grad=True)
    out_BTD, stats = block(x_BTD, rotary_for(cfg))
    q_BT, kv_BT = stats.mask_BT, stats.kv_mask_BT
    (out_BTD * q_BT[..., None]).sum().backward()
    norms_BT = x_BTD.grad.norm(dim=-1)
    before_a_query_BT = q_BT.long().flip(1).cumsum(1).flip(1) > 0
    seen_BT = kv_BT & ~q_BT & before_a_query_BT
    assert seen_BT.any() and (norms_BT[seen_BT] > 0).all()
    assert (norms_BT[kv_BT & ~before_a_query_BT] == 0).all()           # causal
    assert (norms_BT[~kv_BT] == 0).all()
    kv_rows = block.block.attn.qkv.weight.grad[cfg.d_model:]
    assert kv_rows.abs().sum() > 0

    # The predictor's loss (both outputs) reaches the predictor alone.
    x_BTD = torch.randn(2, 16, cfg.d_model, requires_grad=True)
    stats = block(x_BTD, rotary_for(cfg))[1]
    grads = torch.autograd.grad(stats.predictor_loss, [x_BTD, block.router.weight,
                                                       block.predictor.head.weight],
                                allow_unused=True)
    assert grads[0] is None and grads[1] is None and grads[2][1].abs().sum() > 0
    # The key/value offset's loss reaches b_kv, not the router (its logits are detached there).
    x_BTD = torch.randn(2, 16, cfg.d_model)
    stats = block(x_BTD, rotary_for(cfg))[1]
    plain = block._stats(stats.k, block.router(x_BTD), None, stats.mask_BT, stats.mask_BT,
                         None, None).router_aux_loss
    g_w, g_b = torch.autograd.grad(stats.router_aux_loss - plain,
                                   [block.router.weight, block.kv_offset], allow_unused=True)
    assert g_w is None or g_w.abs().sum() == 0
    assert g_b != 0


@pytest.mark.parametrize("mode", CAUSAL)
def test_causal_modes_do_not_see_the_future(make_cfg, mode):
    cfg = kv_cfg(make_cfg)
    model = varied_(MoDLM(cfg)).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        a, b = model(idx, mode=mode), model(changed, mode=mode)
    # To rounding: the attention's padded key/value axis follows the longest row.
    torch.testing.assert_close(a.logits_BTV[:, :12], b.logits_BTV[:, :12], atol=1e-6, rtol=0)
    assert not torch.allclose(a.logits_BTV[:, 12:], b.logits_BTV[:, 12:], atol=1e-4)
    assert any((s.kv_mask_BT & ~s.mask_BT)[:, :12].any() for s in a.routing)


# ---- generation ----------------------------------------------------------------------------------

GEN_CFG = dict(vocab_size=99, d_model=32, n_layers=4, n_heads=2, d_mlp=37, max_seq_len=48,
               init_std=0.1, tie_embeddings=False)
PROMPTS = [[5, 17, 3, 88, 41, 2, 60], [9, 30], [71, 4, 4, 12, 90, 33, 8, 51, 26, 19, 77]]


def gen_model(**routing_kw) -> MoDLM:
    torch.manual_seed(0)
    cfg = ModelConfig(**GEN_CFG, routing=RoutingConfig(capacity=0.25, kv_capacity=0.6,
                                                       **routing_kw))
    return varied_(MoDLM(cfg)).eval()


@pytest.mark.parametrize("mode", CAUSAL)
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3"])
def test_cached_decode_equals_the_full_forward(one_thread, mode, prompts):
    model = gen_model()
    engine = Engine(model, mode)
    state, logits, full = teacher_forced(engine, prompts, n_steps=9)
    kv_only = neither = 0
    for b, ids in enumerate(full):
        with torch.no_grad():
            ref = model(torch.tensor([ids]), mode=mode)
        torch.testing.assert_close(logits[b], ref.logits_BTV[0], atol=1e-5, rtol=0)
        for j, s in enumerate(ref.routing):
            kv_only += int((s.kv_mask_BT & ~s.mask_BT).sum())
            neither += int((~s.kv_mask_BT).sum())
            # Each routed cache holds exactly the row's key/value tokens, at their positions.
            cache = state.caches[model.cfg.routed_layers[j]]
            n = int(cache.n_B[b])
            assert cache.pos_BC[b, :n].tolist() == s.kv_mask_BT[0].nonzero().view(-1).tolist()
    assert kv_only > 0 and neither > 0
    # Routed-token statistics count the queries.
    assert state.routed_tokens[1] == sum(
        int(model(torch.tensor([ids]), mode=mode).routing[0].mask_BT.sum()) for ids in full)


def test_compiled_engine_refuses_kv_routing():
    with pytest.raises(GenerationError, match="kv_capacity.*compile=False"):
        Engine(gen_model(), "router", compile=True)


# ---- FLOPs ---------------------------------------------------------------------------------------

KV_CONFIGS = ("kv", "kv_attention_only", "kv_random", "kv_per_layer")   # tests/test_flops.py


@pytest.mark.parametrize("name", KV_CONFIGS)
def test_kv_routing_costs_more_than_the_papers_block(make_cfg, name):
    """test_flops checks these configurations' forward and training FLOPs against the counter;
    here: keys and values from more tokens cost more, and the parameters are counted."""
    from test_flops import CONFIGS
    cfg = make_cfg(**CONFIGS[name])
    plain = dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, kv_capacity=None))
    assert flops.forward_flops(cfg, 16).total > flops.forward_flops(plain, 16).total
    assert flops.param_count(cfg).total == MoDLM(cfg).num_parameters()


def _force(layer: RoutedBlock, query: bool, kv: bool) -> None:
    """Route every token (or none) as a query and as a key/value, the matmuls still running."""
    thresholds = {layer.capacity: -math.inf if query else math.inf,
                  layer.kv_capacity: -math.inf if kv else math.inf}
    layer.router.causal_threshold = thresholds.__getitem__
    real = layer.predictor.forward
    shift = torch.tensor([1.0 if query else -1.0, 1.0 if kv else -1.0])
    layer.predictor.forward = lambda x: real(x) * 0.0 + shift


@pytest.mark.parametrize("mode", CAUSAL)
@pytest.mark.parametrize("query,kv", [(False, False), (False, True), (True, True)])
def test_decode_flops_match_counter(make_cfg, mode, query, kv):
    cfg = make_cfg(routing=dict(capacity=0.25, kv_capacity=0.5))
    model = MoDLM(cfg).eval()
    for i in cfg.routed_layers:
        _force(model.blocks[i], query, kv)
    engine = Engine(model, mode)
    state, _ = engine.prefill([[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1]])
    counted = count(lambda: engine.decode_step(state, [6, 5])).get_total_flops() / 2
    predicted = flops.decode_flops(cfg, 7, float(query), mode, kv_fraction=float(kv))
    assert rel_close(counted, predicted.total), (counted, predicted.total)
    if kv and not query:    # a key/value-only token pays its projection and nothing else
        none = flops.decode_flops(cfg, 7, 0.0, mode, kv_fraction=0.0).total
        assert predicted.total - none == 2 * 2 * 3 * cfg.d_model ** 2


# ---- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("routing_kw,match", [
    (dict(capacity=0.25, kv_capacity=0.125), "kv_capacity .* below the capacity.*raise"),
    (dict(capacities=(0.25, 0.5), kv_capacity=0.375), r"below the capacity .*\(3, 0.5\)"),
    (dict(kv_capacity=1.5), r"kv_capacity must be null or in \(0, 1\]"),
    (dict(kv_capacity=0.0), r"kv_capacity must be null or in \(0, 1\]"),
])
def test_bad_kv_capacity_is_refused(make_cfg, routing_kw, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(routing=routing_kw)


def test_configs_saved_before_kv_capacity_read_as_the_papers_block(make_cfg):
    """A saved config lacks the field; it reads back as kv_capacity null, the same config."""
    cfg = make_cfg()
    saved = cfg.to_dict()
    del saved["routing"]["kv_capacity"]
    assert ModelConfig.from_dict(saved) == cfg
    assert make_cfg(routing=dict(kv_capacity=1.0)).kv_capacity_of(1) == 1.0
