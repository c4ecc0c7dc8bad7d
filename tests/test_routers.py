"""Routers beyond the paper's (modlm/router.py, modlm/block.py): threshold routing and A-MoD's
parameter-free routing by the attention received in the previous block. The same checks as the
core's: exact counts where defined, zero-update identity, gradients reach what must learn,
causality in the causal modes, cached decode equals the full forward, FLOPs against the counter.

Legend: B batch, T time, D width, H heads.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import teacher_forced
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modlm import flops
from modlm.config import ConfigError, ModelConfig, RoutingConfig
from modlm.generate import Engine, GenerationError
from modlm.model import MoDLM
from modlm.router import attention_received

CFG = dict(vocab_size=99, d_model=32, n_layers=4, n_heads=2, d_mlp=37, max_seq_len=48,
           init_std=0.1, tie_embeddings=False)
PROMPTS = [[5, 17, 3, 88, 41, 2, 60], [9, 30], [71, 4, 4, 12, 90, 33, 8, 51, 26, 19, 77]]
THRESHOLD = dict(router="threshold", predictor=False, aux_loss_weight=1.0, capacity=0.5)
ATTENTION = dict(router="attention", aux_loss_weight=0.0, capacity=0.5)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest's `one_thread`)."""


def make_model(routing: dict, seed: int = 0, **fields) -> MoDLM:
    """A tiny model; routers and predictors scaled so that decisions vary from token to token."""
    torch.manual_seed(seed)
    model = MoDLM(ModelConfig(**{**CFG, **fields}, routing=RoutingConfig(**routing))).eval()
    with torch.no_grad():
        for i in model.cfg.routed_layers:
            block = model.blocks[i]
            if hasattr(block.router, "weight"):
                block.router.weight.mul_(3.0)
            if block.predictor is not None:
                block.predictor.head.weight.mul_(3.0)
    return model


def ids(B: int = 3, T: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=g)


def count_flops(fn) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def routed_input(model: MoDLM, idx_BT: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream entering block `layer` (the blocks before it run in "topk" mode)."""
    x = model.embed(idx_BT)
    for block in model.blocks[:layer]:
        x = block(x, model.rotary)[0]
    return x


# ---- threshold routing -------------------------------------------------------------------------


def test_threshold_routes_every_token_past_its_threshold_in_every_mode():
    """A token is routed iff sigmoid(w^T x + b) > 0.5, in training ("topk") as in sampling
    ("router"): the two forwards are the same computation, and counts vary per row."""
    model = make_model(THRESHOLD)
    idx = ids()
    with torch.no_grad():
        model.blocks[1].router.bias.fill_(0.3)
        train, sample = model(idx, mode="topk"), model(idx, mode="router")
        x_BTD = routed_input(model, idx, 1)
        r_BT = x_BTD @ model.blocks[1].router.weight + 0.3
    assert torch.equal(train.logits_BTV, sample.logits_BTV)
    mask = train.routing[0].mask_BT
    assert torch.equal(mask, r_BT > 0)
    assert len(set(mask.sum(1).tolist())) > 1                    # counts vary per row
    assert 0 < float(train.routing[0].fraction) < 1


def test_threshold_unrouted_tokens_are_bit_identical():
    model = make_model(THRESHOLD)
    idx = ids()
    block = model.blocks[1]
    with torch.no_grad():
        x_BTD = routed_input(model, idx, 1)
        out_BTD, stats = block(x_BTD, model.rotary, "topk")
    skip = ~stats.mask_BT
    assert skip.any() and stats.mask_BT.any()
    assert torch.equal(out_BTD[skip], x_BTD[skip])
    assert not torch.allclose(out_BTD[stats.mask_BT], x_BTD[stats.mask_BT])


def test_threshold_penalty_is_the_squared_gap_of_the_routed_share_and_pulls_it_back():
    """The penalty's value is (realized share - capacity)^2; its gradient lowers the threshold
    router's logits when too many tokens route and raises them when too few do."""
    for bias, sign in ((2.0, 1.0), (-2.0, -1.0)):        # nearly all routed / nearly none
        model = make_model(THRESHOLD)
        with torch.no_grad():
            model.blocks[1].router.bias.fill_(bias)
        out = model(ids(), ids(seed=2))
        gaps = [(float(s.fraction) - 0.5) ** 2 for s in out.routing]   # blocks 1 and 3
        assert gaps[0] > 0.1                                  # block 1 far from its capacity
        torch.testing.assert_close(float(out.router_aux_loss.detach()), sum(gaps) / len(gaps))
        grad = torch.autograd.grad(out.router_aux_loss, model.blocks[1].router.bias)[0]
        assert float(grad) * sign > 0          # descent moves the share towards the capacity


def test_threshold_lm_loss_trains_the_router_and_the_block():
    model = make_model(THRESHOLD).train()
    out = model(ids(), ids(seed=2))
    out.lm_loss.backward()
    router = model.blocks[1].router
    assert router.weight.grad.abs().sum() > 0 and router.bias.grad.abs() > 0
    assert model.blocks[1].block.attn.qkv.weight.grad.abs().sum() > 0


def test_threshold_training_forward_is_causal():
    """Unlike top-k, the threshold router's training forward never looks ahead: changing a
    later token leaves every earlier logit unchanged."""
    model = make_model(THRESHOLD)
    a = ids(B=1, T=20)
    b = a.clone()
    b[0, 14:] = (b[0, 14:] + 7) % CFG["vocab_size"]
    with torch.no_grad():
        la, lb = model(a).logits_BTV, model(b).logits_BTV
    torch.testing.assert_close(la[0, :14], lb[0, :14], atol=0, rtol=0)
    assert not torch.allclose(la[0, 14:], lb[0, 14:])


def test_threshold_forward_and_training_flops_match_the_counter():
    """Every token routed (the bias out of reach): the counter equals the FLOP module's count
    for a block at capacity 1, the router included."""
    model = make_model({**THRESHOLD, "capacity": 1.0})
    with torch.no_grad():
        for i in model.cfg.routed_layers:
            model.blocks[i].router.bias.fill_(1e4)
    B, T = 2, 16
    idx, tgt = ids(B, T), ids(B, T, seed=2)
    with torch.no_grad():
        fwd = count_flops(lambda: model(idx)) / B
    assert math.isclose(fwd, flops.forward_flops(model.cfg, T).total, rel_tol=1e-9)
    train = count_flops(lambda: model(idx, tgt).loss.backward()) / B
    assert math.isclose(train, flops.training_flops(model.cfg, T), rel_tol=1e-9)
    assert flops.param_count(model.cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bad, match", [
    (dict(predictor=True), "predictor=false"),
    (dict(aux_loss_weight=0.0), "aux_loss_weight > 0"),
    (dict(kv_capacity=0.75), "kv_capacity to null"),
])
def test_threshold_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        RoutingConfig(**{**THRESHOLD, **bad})


# ---- A-MoD: routing by the attention received in the previous block -----------------------------


def test_attention_received_by_hand():
    """Mean over heads and over the queries that can see a token of its causal attention
    probability relative to uniform ((i + 1) p for query i), written out with loops; uniform
    attention scores every token 1."""
    torch.manual_seed(3)
    B, H, G, T, Dh = 2, 4, 2, 6, 8
    q, k = torch.randn(B, H, T, Dh), torch.randn(B, G, T, Dh)
    got = attention_received(q, k)
    want = torch.zeros(B, T)
    for b in range(B):
        for h in range(H):
            kh = k[b, h // (H // G)]
            for i in range(T):
                p = torch.softmax(q[b, h, i] @ kh[:i + 1].T / math.sqrt(Dh), dim=0)
                want[b, :i + 1] += (i + 1) * p / (H * (T - torch.arange(i + 1)))
    torch.testing.assert_close(got, want)
    assert got.std() > 0.1
    torch.testing.assert_close(attention_received(torch.zeros(B, H, T, Dh), k),
                               torch.ones(B, T))


def test_attention_routes_the_top_k_of_the_attention_received_before_it():
    """In "topk" mode an A-MoD block routes exactly k tokens per row: those that received the
    most attention in the dense block before it."""
    model = make_model(ATTENTION)
    idx = ids()
    T = idx.shape[1]
    with torch.no_grad():
        out = model(idx)
        x0 = model.embed(idx)
        _, _, got_BT = model.blocks[0](x0, model.rotary, received=True)
    mask = out.routing[0].mask_BT
    k = math.floor(0.5 * T)
    assert mask.sum(1).tolist() == [k] * idx.shape[0]
    want = torch.zeros_like(mask).scatter(1, got_BT.topk(k, dim=1).indices, True)
    assert torch.equal(mask, want)
    assert not any(p.requires_grad for p in model.blocks[1].router.parameters())


def test_attention_unrouted_tokens_are_bit_identical_and_weights_are_one():
    model = make_model(ATTENTION)
    idx = ids()
    with torch.no_grad():
        x0 = model.embed(idx)
        x1, _, got_BT = model.blocks[0](x0, model.rotary, received=True)
        out_BTD, stats = model.blocks[1](x1, model.rotary, "topk", prior_BT=got_BT)
    skip = ~stats.mask_BT
    assert torch.equal(out_BTD[skip], x1[skip])
    assert torch.equal(stats.weights_BT, torch.ones_like(stats.weights_BT))


def test_attention_gradients_reach_the_block_and_the_predictor_alone():
    """No router weights; the LM loss trains the routed block, the predictor loss trains only
    the predictor (its input is a stop-gradient)."""
    model = make_model(ATTENTION).train()
    out = model(ids(), ids(seed=2))
    assert out.router_aux_loss is None and out.predictor_loss is not None
    out.predictor_loss.backward()
    assert model.blocks[1].predictor.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "predictor" not in n)
    model.zero_grad()
    model(ids(), ids(seed=2)).lm_loss.backward()
    assert model.blocks[1].block.attn.qkv.weight.grad.abs().sum() > 0


def test_attention_topk_looks_ahead_but_the_predictor_mode_is_causal():
    model = make_model(ATTENTION)
    a = ids(B=1, T=20)
    moved = 0
    for shift in range(1, 6):
        b = a.clone()
        b[0, 14:] = (b[0, 14:] + shift) % CFG["vocab_size"]
        with torch.no_grad():
            pa, pb = model(a, mode="predictor"), model(b, mode="predictor")
            ta, tb = model(a), model(b)
        torch.testing.assert_close(pa.logits_BTV[0, :14], pb.logits_BTV[0, :14], atol=0, rtol=0)
        # Top-k by attention received is not causal: the future can move the routed set.
        if not torch.equal(ta.routing[0].mask_BT[0, :14], tb.routing[0].mask_BT[0, :14]):
            moved += 1
            assert not torch.allclose(ta.logits_BTV[0, :14], tb.logits_BTV[0, :14])
    assert moved > 0


def test_attention_router_costs_the_q_k_product_before_it_and_has_no_weights():
    """The counter checks of tests/test_flops.py ("attention_router") see the Q K^T product the
    block before each routed block forms to read the attention received; here its size."""
    model = make_model(ATTENTION)
    T = 16
    f = flops.forward_flops(model.cfg, T)
    assert f.router == 2 * T * T * CFG["d_model"] * len(model.cfg.routed_layers)
    assert flops.param_count(model.cfg).total == sum(p.numel() for p in model.parameters())
    assert not list(model.blocks[1].router.parameters())


def test_attention_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="block before each routed block must be dense"):
        ModelConfig(**CFG, routing=RoutingConfig(**ATTENTION, layers="all"))
    with pytest.raises(ConfigError, match="aux_loss_weight=0"):
        RoutingConfig(**{**ATTENTION, "aux_loss_weight": 0.01})
    model = make_model(ATTENTION)
    with pytest.raises(ValueError, match="mode='predictor'"):
        model(ids(), mode="router")
    with pytest.raises(GenerationError, match="mode='predictor'"):
        Engine(model, "router")
    with pytest.raises(ValueError, match="run it through the model's forward"):
        model.blocks[1](torch.randn(1, 4, CFG["d_model"]), model.rotary, "topk")


# ---- both: cached decode, decode FLOPs --------------------------------------------------------


@pytest.mark.parametrize("routing, mode, train_mode", [(THRESHOLD, "router", "topk"),
                                                       (ATTENTION, "predictor", "predictor")])
def test_cached_decode_equals_the_full_forward(routing, mode, train_mode):
    """Prefill and decode steps give the full forward's logits at every position (for the
    threshold router that is the training forward itself: it routes the same way)."""
    model = make_model(routing)
    engine = Engine(model, mode)
    _, logits, full = teacher_forced(engine, PROMPTS, n_steps=9)
    for b, seq in enumerate(full):
        with torch.no_grad():
            ref = model(torch.tensor([seq]), mode=train_mode)
        torch.testing.assert_close(logits[b], ref.logits_BTV[0], atol=1e-5, rtol=0)
        assert 0 < float(ref.routing[0].fraction) < 1


@pytest.mark.parametrize("routing, mode", [(THRESHOLD, "router"), (ATTENTION, "predictor")])
@pytest.mark.parametrize("route", [False, True])
def test_decode_flops_match_the_counter(routing, mode, route):
    model = make_model(routing)
    for i in model.cfg.routed_layers:
        layer = model.blocks[i]
        if mode == "router":
            layer.router.causal_threshold = lambda capacity: -math.inf if route else math.inf
        else:
            real = layer.predictor.forward
            layer.predictor.forward = lambda x, real=real: real(x) * 0.0 + (1.0 if route else -1.0)
    engine = Engine(model, mode)
    state, _ = engine.prefill([[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1]])
    counted = count_flops(lambda: engine.decode_step(state, [6, 5])) / 2
    rate = 1.0 if route else 0.0
    assert math.isclose(counted, flops.decode_flops(model.cfg, 7, rate, mode).total,
                        rel_tol=1e-9)


def test_new_routers_survive_a_checkpoint_round_trip(tmp_path):
    """Threshold, A-MoD and decoupled key/value routing: config and every weight (the learned
    threshold and key/value offset set away from their initial 0) come back, and so do the
    causal-mode logits."""
    from modlm.checkpoint import load_model, save_checkpoint
    from modlm.tokenizer import ByteTokenizer
    kv = dict(capacity=0.25, kv_capacity=0.5)
    for routing, mode in ((THRESHOLD, "router"), (ATTENTION, "predictor"), (kv, "predictor"),
                          (kv, "router")):
        model = make_model(routing, vocab_size=256)
        with torch.no_grad():      # the learned scalars away from their initial values
            for i in model.cfg.routed_layers:
                for name in ("bias", "kv_offset"):
                    owner = model.blocks[i] if name == "kv_offset" else model.blocks[i].router
                    if getattr(owner, name, None) is not None:
                        getattr(owner, name).fill_(0.3 + i)
        path = save_checkpoint(tmp_path / f"{routing.get('router', 'kv')}-{mode}", step=1,
                               model=model, optimizer_state=None, trainer_state={"step": 1},
                               model_cfg=model.cfg, tokenizer=ByteTokenizer())
        loaded, _ = load_model(path)
        assert loaded.cfg.routing == model.cfg.routing
        want = model.state_dict()
        assert loaded.state_dict().keys() == want.keys()
        assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids(), mode=mode).logits_BTV,
                                       model(ids(), mode=mode).logits_BTV, atol=0, rtol=0)


@pytest.mark.parametrize("routing, mode", [(THRESHOLD, "router"), (ATTENTION, "predictor")])
def test_static_step_equals_the_eager_step(routing, mode):
    """The compiled engine's step (run uncompiled: the same computation) gives the eager
    step's logits for both routers."""
    eager = Engine(make_model(routing), mode)
    static = Engine(make_model(routing), mode)
    static.compiled, static._static_fn = True, static._static
    _, e_logits, _ = teacher_forced(eager, PROMPTS, n_steps=9)
    _, s_logits, _ = teacher_forced(static, PROMPTS, n_steps=9)
    for a, b in zip(e_logits, s_logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


FSDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from modlm.config import ModelConfig, RoutingConfig
from modlm.model import MoDLM
dist.init_process_group("gloo", rank=0, world_size=1)
for routing in ({}, {"router": "attention", "aux_loss_weight": 0.0}):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=99, d_model=32, n_layers=4, n_heads=2, d_mlp=37,
                      max_seq_len=16, routing=RoutingConfig(capacity=0.5, **routing))
    model = MoDLM(cfg)
    idx = torch.randint(0, 99, (2, 16))
    want = model(idx, idx).loss
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    got = model(idx, idx).loss
    got.backward()
    assert torch.allclose(got, want), (got, want)
    print("ok", routing.get("router", "learned"))
dist.barrier()
dist.destroy_process_group()
"""


def test_blocks_run_through_module_calls_so_fsdp_gathers_their_weights(tmp_path):
    """FSDP2 gathers a sharded block's weights in a hook on the module call: the model calls
    every block as a module (also the block that gives A-MoD its scores), so a sharded model
    trains. One process under gloo, in a subprocess (the slow suite runs two)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "learned", "ok", "attention"]


def test_timing_sets_fresh_threshold_routers_to_their_capacity():
    """A fresh threshold router routes about half the tokens; step timing (the experiments'
    interleaved timings, --plan) first sets each one's bias so it routes its capacity, as a
    trained one does."""
    from modlm.measure import thresholds_at_capacity
    model = make_model({**THRESHOLD, "capacity": 0.125})
    idx = ids(4, 40)
    with torch.no_grad():
        before = [float(s.fraction) for s in model(idx).routing]
    thresholds_at_capacity(model, idx)
    with torch.no_grad():
        after = [float(s.fraction) for s in model(idx).routing]
    assert all(f > 0.3 for f in before)
    assert after == pytest.approx([0.125, 0.125], abs=0.01)
