"""Generation engine: cached decoding equals the full causal forward, routed caches hold only
routed tokens, decode steps skip unrouted rows, sampling and input checks."""

from __future__ import annotations

import pytest
import torch
from support import decode_routed_row_counts, teacher_forced

from modlm.config import ModelConfig, RoutingConfig
from modlm.generate import Engine, GenerationError, sample_next
from modlm.layers import apply_rotary
from modlm.model import MoDLM

# Untied embeddings and a wider init so greedy outputs vary and logits are far from ties.
CFG = dict(vocab_size=99, d_model=32, n_layers=4, n_heads=2, d_mlp=37, max_seq_len=48,
           init_std=0.1, tie_embeddings=False)
PROMPTS = [[5, 17, 3, 88, 41, 2, 60], [9, 30], [71, 4, 4, 12, 90, 33, 8, 51, 26, 19, 77]]
MODES = ["dense", "router", "predictor"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest's `one_thread`)."""


def make_model(kind: str = "router", seed: int = 0, **routing) -> MoDLM:
    """kind "dense" or a causal mode; routers / predictors scaled so decisions vary."""
    r = RoutingConfig(router="none") if kind == "dense" else RoutingConfig(capacity=0.5, **routing)
    torch.manual_seed(seed)
    model = MoDLM(ModelConfig(**CFG, routing=r)).eval()
    with torch.no_grad():
        for block in model.blocks[1::2] if kind != "dense" else []:
            block.router.weight.mul_(3.0)
            if block.predictor is not None:
                block.predictor.head.weight.mul_(3.0)
    return model


def engine_for(kind: str, **kw) -> Engine:
    return Engine(make_model(kind, **kw), "router" if kind == "dense" else kind)


def full_forward(engine: Engine, ids: list[int]):
    with torch.no_grad():
        return engine.model(torch.tensor([ids]), mode=engine.mode)


def routed_fractions(engine: Engine, ids: list[int]) -> list[float]:
    return [float(r.fraction) for r in full_forward(engine, ids).routing]


# ---- 1, 2, 3: cached decoding equals full recomputation ----------------------------------------


@pytest.mark.parametrize("kind", MODES)
def test_prefill_and_decode_logits_equal_full_forward(kind):
    engine = engine_for(kind)
    _, logits, full = teacher_forced(engine, PROMPTS, n_steps=9)
    for b, ids in enumerate(full):
        ref = full_forward(engine, ids)
        # logits at every fed position: prompt (prefill) and each decoded token
        assert logits[b].shape == ref.logits_BTV[0].shape
        torch.testing.assert_close(logits[b], ref.logits_BTV[0], atol=1e-5, rtol=0)
        if kind != "dense":  # the knob changed something: routing really varies
            assert all(0.0 < f < 1.0 for f in routed_fractions(engine, ids))
    assert len({len(p) for p in PROMPTS}) == len(PROMPTS)


@pytest.mark.parametrize("kind", MODES)
def test_greedy_with_cache_equals_full_recomputation(kind):
    engine = engine_for(kind)
    result = engine.generate(PROMPTS, 12)
    for b, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(full_forward(engine, seq).logits_BTV[0, -1].argmax()))
        assert list(result.tokens[b]) == seq[len(prompt):]
    assert len({tuple(t) for t in result.tokens}) == len(PROMPTS)  # rows differ
    if kind != "dense":
        assert set(result.routed_fraction) == {1, 3}
        assert all(0.0 < f < 1.0 for f in result.routed_fraction.values())
        assert 0 < result.kv_cache_bytes < result.dense_kv_cache_bytes
    else:
        assert result.routed_fraction == {}
        assert result.kv_cache_bytes == result.dense_kv_cache_bytes


@pytest.mark.parametrize("kind", MODES)
def test_batch_generates_what_each_prompt_generates_alone(kind):
    engine = engine_for(kind)
    batch = engine.generate(PROMPTS, 10)
    for b, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], 10)
        assert alone.tokens[0] == batch.tokens[b]


# ---- 4, 5: routed caches and skipping ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["router", "predictor"])
def test_routed_caches_hold_exactly_the_routed_tokens(kind):
    engine = engine_for(kind)
    state, _, full = teacher_forced(engine, PROMPTS, n_steps=8)
    routed_idx = [i for i, blk in enumerate(engine.model.blocks) if hasattr(blk, "router")]
    assert routed_idx == [1, 3]
    routed = {layer: 0 for layer in routed_idx}
    for b, ids in enumerate(full):  # every continuation token was fed, so all are cached
        ref = full_forward(engine, ids)
        for layer, stats in zip(routed_idx, ref.routing):
            cache = state.caches[layer]
            want = stats.mask_BT[0].nonzero().squeeze(-1)
            n = int(cache.n_B[b])
            assert n == len(want)
            assert cache.pos_BC[b, :n].tolist() == want.tolist()
            routed[layer] += n
        for layer in (0, 2):  # dense caches hold every token
            assert int(state.caches[layer].n_B[b]) == len(ids)
    total = sum(map(len, full))
    assert all(0 < n < total for n in routed.values())
    # Routed caches allocate far fewer slots than the dense ones (memory follows routing).
    assert state.caches[1].slots < state.caches[0].slots


def test_routed_keys_are_rotated_at_true_positions():
    engine = engine_for("router")
    state, _, full = teacher_forced(engine, PROMPTS[:1], n_steps=5)
    block = engine.model.blocks[1]
    ids = full[0]
    captured = {}

    def grab(module, args, out):
        captured["x"] = out

    h = block.block.attn_norm.register_forward_hook(grab)
    try:
        full_forward(engine, ids)
    finally:
        h.remove()
    h_BKD = captured["x"]  # the routed tokens' normed inputs, in time order
    K = h_BKD.shape[1]
    assert 0 < K < len(ids)
    qkv = block.block.attn.qkv(h_BKD).view(1, K, 3, 2, -1)
    # the true positions come from the full forward's routing mask, not from the cache under test
    pos = full_forward(engine, ids).routing[0].mask_BT[0].nonzero().T
    assert torch.equal(state.caches[1].pos_BC[:, :K], pos)
    k = apply_rotary(qkv[:, :, :2], engine.model.rotary(pos))[:, :, 1]
    torch.testing.assert_close(state.caches[1].k_BHCd[0, :, :K], k[0].transpose(0, 1).detach(),
                               atol=1e-5, rtol=0)


def _count_mlp_rows(engine: Engine):
    calls = {i: [] for i, blk in enumerate(engine.model.blocks) if hasattr(blk, "router")}
    for i in calls:
        mlp = engine.model.blocks[i].block.mlp
        original = mlp.forward

        def forward(x, _original=original, _i=i):
            calls[_i].append(x.shape[0])
            return _original(x)

        mlp.forward = forward
    return calls


def test_decode_step_runs_a_routed_block_only_for_routed_rows():
    engine = engine_for("router")
    state, _, full = teacher_forced(engine, PROMPTS, n_steps=0)
    calls = _count_mlp_rows(engine)
    g = torch.Generator().manual_seed(3)
    cont = torch.randint(0, 99, (len(PROMPTS), 10), generator=g)
    refs = [full_forward(engine, p + cont[b].tolist()).routing for b, p in enumerate(PROMPTS)]
    seen_sizes = decode_routed_row_counts(engine, state, calls, refs, PROMPTS, cont)
    assert len(seen_sizes) > 1  # steps differed in how many rows routed

    # A model whose routers route nothing: decode never enters a routed block's MLP.
    engine = engine_for("router")
    for blk in engine.model.blocks[1::2]:
        blk.router.weight.data.zero_()  # logit 0 is not > 0: no token routes
    calls = _count_mlp_rows(engine)
    result = engine.generate(PROMPTS, 5)
    assert calls == {1: [], 3: []}
    assert result.routed_fraction == {1: 0.0, 3: 0.0}


# ---- 6: sampling, stopping, streaming, errors --------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seed_matters():
    engine = engine_for("router")
    a = engine.generate(PROMPTS, 10, temperature=1.0, seed=7)
    b = engine.generate(PROMPTS, 10, temperature=1.0, seed=7)
    c = engine.generate(PROMPTS, 10, temperature=1.0, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    # top_k=1 is greedy whatever the temperature
    assert engine.generate(PROMPTS, 6, temperature=2.0, top_k=1, seed=3).tokens == \
        engine.generate(PROMPTS, 6).tokens


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.5, 0.0, -1.0, 1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    free = set(sample_next(logits, temperature=1.0, generator=g).tolist())
    assert len(free) >= 5
    top2 = set(sample_next(logits, temperature=1.0, top_k=2, generator=g).tolist())
    assert top2 == {0, 1}
    # probs ~ [0.58, 0.21, 0.13, ...]: top_p 0.7 keeps the first two, 0.5 only the first
    assert set(sample_next(logits, temperature=1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, temperature=1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, temperature=0.0).tolist()) == {0}


def test_stop_tokens_end_rows_independently():
    engine = engine_for("router")
    free = engine.generate(PROMPTS, 10)
    # a token row 0 produces at step 3 that row 1 never produces
    stop = free.tokens[0][3]
    assert stop not in free.tokens[1] and stop not in free.tokens[0][:3]
    result = engine.generate(PROMPTS, 10, stop_token_ids=[stop])
    assert result.tokens[0] == free.tokens[0][:4]
    assert result.finish_reasons[0] == "stop_token"
    assert result.tokens[1] == free.tokens[1]
    assert result.finish_reasons[1] == "length"
    for b in range(3):
        expect = free.tokens[b]
        if stop in expect:
            expect = expect[:expect.index(stop) + 1]
        assert result.tokens[b] == expect


class LetterTokenizer:
    """Token i <-> one letter; enough for stop strings and the text helper."""

    def decode(self, ids):
        return "".join(chr(ord("A") + i % 26) for i in ids)

    def encode(self, text):
        return [ord(c) - ord("A") for c in text]


def test_stop_strings_and_text_helper():
    engine = engine_for("router")
    tok = LetterTokenizer()
    free = engine.generate(PROMPTS, 10)
    stop = tok.decode(free.tokens[0][2:4])
    result = engine.generate(PROMPTS, 10, stop_strings=[stop], tokenizer=tok)
    assert result.finish_reasons[0] == "stop_string"
    assert result.tokens[0] == free.tokens[0][:4]
    plain = engine.generate_text(tok, "FRDKP", 10)
    assert len(plain.texts[0]) == 10
    text_stop = plain.texts[0][4:6]  # taken from the text, so the cut must happen
    text = engine.generate_text(tok, "FRDKP", 10, stop_strings=[text_stop])
    assert text.result.finish_reasons[0] == "stop_string"
    assert text.texts[0] == plain.texts[0][:plain.texts[0].index(text_stop)]


def test_stream_text_prints_the_text_helpers_continuation():
    engine = engine_for("router")
    tok = LetterTokenizer()
    plain = engine.generate_text(tok, "FRDKP", 8)
    pieces = list(engine.stream_text(tok, "FRDKP", 8))
    assert len(pieces) == 8 and "".join(pieces) == plain.texts[0]
    stop = plain.texts[0][3:5]
    cut_pieces = list(engine.stream_text(tok, "FRDKP", 8, stop_strings=[stop]))
    cut = "".join(cut_pieces)
    assert cut == engine.generate_text(tok, "FRDKP", 8, stop_strings=[stop]).texts[0]
    assert cut == plain.texts[0][:plain.texts[0].index(stop)]


def test_streaming_yields_each_step():
    engine = engine_for("router")
    steps = []
    result = engine.generate(PROMPTS, 6, stop_token_ids=[engine.generate(PROMPTS, 6).tokens[1][2]],
                             on_step=steps.append)
    rebuilt = [[] for _ in PROMPTS]
    for s in steps:
        for row, t in zip(s.rows, s.tokens):
            rebuilt[row].append(t)
    assert [tuple(r) for r in rebuilt] == list(result.tokens)
    assert len(steps[-1].rows) < len(PROMPTS)  # a finished row left the batch
    stream = engine.stream(PROMPTS, 6)
    assert len(list(stream)) == 6
    assert stream.result.tokens == engine.generate(PROMPTS, 6).tokens


def test_context_limit_refused_or_truncated():
    engine = engine_for("router")
    long = list(range(1, 41))  # 40 tokens, max_seq_len 48
    with pytest.raises(GenerationError, match="exceed the context max_seq_len=48"):
        engine.generate([long, [1, 2]], 10)
    result = engine.generate([long, [1, 2]], 10, truncate=True)
    assert result.finish_reasons == ("context", "length")
    assert len(result.tokens[0]) == 8 and len(result.tokens[1]) == 10


def test_prefill_max_tokens_bounds_decoding_and_its_old_name_still_works():
    engine = engine_for("router")
    state, logits = engine.prefill(PROMPTS, max_tokens=12)   # the longest prompt has 11
    assert state.max_tokens == 12
    tok_B = engine.decode_step(state, logits.argmax(-1)).argmax(-1)   # that row reaches 12
    with pytest.raises(GenerationError, match=r"\(12\); prefill with a larger max_tokens"):
        engine.decode_step(state, tok_B)
    with pytest.warns(DeprecationWarning, match=r"prefill\(max_tokens=") as caught:
        old, old_logits = engine.prefill(PROMPTS, capacity=12)
    assert caught[0].filename == __file__          # the warning names the caller's line
    assert old.max_tokens == 12
    torch.testing.assert_close(old_logits, logits, atol=0, rtol=0)
    with pytest.warns(DeprecationWarning, match="DecodeState.max_tokens"):
        assert old.capacity == 12
    with pytest.raises(GenerationError, match="give max_tokens alone"):
        engine.prefill(PROMPTS, max_tokens=13, capacity=12)


@pytest.mark.parametrize("prompts, match", [
    ([[1, 2], []], "prompt 1 is empty"),
    ([list(range(48))], "prompt 0 has 48 tokens but the model's context is max_seq_len=48"),
    ([[1, 99]], r"token ids \[99\] outside the vocabulary 0..98"),
    ([[-1, 3]], r"token ids \[-1\] outside the vocabulary"),
    ([], "no prompts given"),
    ([1, 2, 3], "prompt 0 is not a list of token ids"),
])
def test_bad_prompts_are_refused(prompts, match):
    engine = engine_for("router")
    with pytest.raises(GenerationError, match=match):
        engine.generate(prompts, 2)
    engine.generate([[1, 2]], 2)  # a good prompt goes through


def test_bad_modes_and_options_are_refused():
    with pytest.raises(GenerationError, match="unknown generation mode 'greedy'"):
        Engine(make_model("router"), "greedy")
    with pytest.raises(GenerationError, match="'topk' is not causal"):
        Engine(make_model("router"), "topk")
    with pytest.raises(GenerationError, match="aux_loss_weight=0"):
        Engine(make_model("router", aux_loss_weight=0.0), "router")
    with pytest.raises(GenerationError, match="predictor is absent or untrained"):
        Engine(make_model("router", predictor=False), "predictor")
    Engine(make_model("router", aux_loss_weight=0.0), "predictor")  # the other mode still works
    engine = Engine(make_model("router"), "router")
    for kwargs, match in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                          (dict(top_p=0.0), "top_p"), (dict(stop_strings=["x"]), "tokenizer")]:
        with pytest.raises(GenerationError, match=match):
            engine.generate(PROMPTS, 2, **kwargs)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        engine.generate(PROMPTS, 0)


def test_routed_caches_grow_without_changing_results(monkeypatch):
    engine = engine_for("router")
    _, expected, _ = teacher_forced(engine, PROMPTS, n_steps=12)
    monkeypatch.setattr("modlm.generate.engine._ROUTED_HEADROOM", 0)  # read by prefill
    state, logits, full = teacher_forced(engine, PROMPTS, n_steps=12)
    prefill_slots = engine.prefill(PROMPTS)[0].caches[1].slots
    assert state.caches[1].slots > prefill_slots  # the cache had to grow during decode
    for b in range(len(PROMPTS)):
        torch.testing.assert_close(logits[b], expected[b], atol=1e-5, rtol=0)


def test_block_zero_routed_model_generates():
    engine = Engine(make_model("router", layers="all", first_layer_dense=False), mode="router")
    assert engine.model.cfg.routed_layers[0] == 0
    state, logits, full = teacher_forced(engine, PROMPTS, n_steps=3)
    for b, ids in enumerate(full):
        ref = full_forward(engine, ids).logits_BTV[0]
        torch.testing.assert_close(logits[b], ref, atol=1e-5, rtol=0)


def test_untrained_predictor_is_refused():
    with pytest.raises(GenerationError, match="predictor is absent or untrained"):
        Engine(make_model("predictor", predictor_loss_weight=0.0), mode="predictor")


def test_seeded_sampling_does_not_depend_on_the_batch():
    engine = engine_for("router")
    seeds = [5, 6, 7]
    stops = dict(stop_token_ids=[PROMPTS[1][0]])
    batch = engine.generate(PROMPTS, 6, temperature=1.0, seed=seeds, **stops)
    for b, p in enumerate(PROMPTS):
        alone = engine.generate([p], 6, temperature=1.0, seed=[seeds[b]], **stops)
        assert alone.tokens[0] == batch.tokens[b]
    # one int seeds every row differently (two equal prompts sample different continuations)
    twins = engine.generate([PROMPTS[0], PROMPTS[0]], 6, temperature=1.0, seed=5)
    assert twins.tokens[0] != twins.tokens[1]


def test_tiny_temperature_behaves_like_greedy():
    engine = engine_for("router")
    greedy = engine.generate(PROMPTS, 5)
    cold = engine.generate(PROMPTS, 5, temperature=1e-30, seed=0)
    assert cold.tokens == greedy.tokens


def test_decode_statistics_are_counted_from_the_decisions():
    engine = engine_for("router")
    result = engine.generate(PROMPTS[:1], 8)
    ids = PROMPTS[0] + list(result.tokens[0][:-1])  # every token fed through the model
    ref = full_forward(engine, ids)
    for stats in ref.routing:
        mask = stats.mask_BT[0]
        assert result.routed_fraction[stats.layer] == pytest.approx(float(mask.float().mean()))
        decode_part = mask[len(PROMPTS[0]):]
        assert result.decode_routed_fraction[stats.layer] == pytest.approx(
            float(decode_part.float().mean()))
    held = sum(int(s.mask_BT.sum()) for s in ref.routing) + len(ids) * (
        engine.model.cfg.n_layers - len(ref.routing))
    entry = 2 * engine.model.cfg.d_model * 4  # keys and values, float32
    assert result.kv_cache_bytes == held * entry
    assert result.kv_cache_allocated_bytes >= result.kv_cache_bytes


def test_bfloat16_model_generates_what_float32_does():
    """A bfloat16 model's cached logits stay within bfloat16 rounding of the float32 model's
    (teacher-forced, prompt and decode steps), and its greedy tokens agree on most positions."""
    f32, bf16 = engine_for("router"), Engine(make_model("router").to(torch.bfloat16), "router")
    _, logits_32, _ = teacher_forced(f32, PROMPTS, n_steps=9)
    _, logits_16, _ = teacher_forced(bf16, PROMPTS, n_steps=9)
    for a, b in zip(logits_32, logits_16):
        assert b.dtype == torch.bfloat16
        # |logits| up to about 2, where a bfloat16 unit in the last place is 2^-6 ~ 0.016: the
        # error seen is under 0.015; 0.05 allows about three units
        torch.testing.assert_close(b.float(), a, atol=0.05, rtol=0)
        assert (b.float().argmax(-1) == a.argmax(-1)).float().mean() >= 0.9
    n = 8
    tokens_32, tokens_16 = f32.generate(PROMPTS, n).tokens, bf16.generate(PROMPTS, n).tokens
    assert all(len(t) == n for t in tokens_16)
    agree = sum(x == y for r32, r16 in zip(tokens_32, tokens_16) for x, y in zip(r32, r16))
    assert agree >= 0.9 * n * len(PROMPTS)


def test_rate_router_routes_at_its_rate_whatever_the_text(make_cfg):
    """measure.route_at_rate: sampling routes the given share of tokens in every routed block,
    at any text (greedy decoding of a random model repeats itself, which would make a
    content-based router route all or nothing), and rates 0 and 1 route nothing and
    everything."""
    from modlm.measure import RateRouter, route_at_rate
    cfg = make_cfg(max_seq_len=512)
    fractions = {}
    for rate in (0.0, 0.25, 1.0):
        torch.manual_seed(0)
        model = MoDLM(cfg).eval()
        route_at_rate(model, rate, seed=3)
        assert all(isinstance(model.blocks[i].router, RateRouter) for i in cfg.routed_layers)
        result = Engine(model, "router").generate([[1] * 8] * 4, 96)      # greedy
        fractions[rate] = result.decode_routed_fraction
    assert set(fractions[0.0].values()) == {0.0} and set(fractions[1.0].values()) == {1.0}
    for f in fractions[0.25].values():      # 4 x 95 decisions per block: sd 0.022
        assert abs(f - 0.25) < 0.08
    with pytest.raises(ValueError, match="learned routers"):
        route_at_rate(MoDLM(make_cfg(routing=dict(router="none"))), 0.5)


# ---- the compiled decode step (static shapes) --------------------------------------------------


def static_engine(kind: str, **kw) -> Engine:
    """An engine whose decode step is the static-shape step (modlm/generate/static.py) run
    without compiling it: the same computation the compiled graph performs, tested fast."""
    engine = engine_for(kind, **kw)
    engine.compiled = True
    engine._static_fn = engine._static
    return engine


@pytest.mark.parametrize("kind", MODES)
def test_static_step_equals_the_eager_step(kind, monkeypatch):
    """Every logit of prefill + teacher-forced decode, rows of different lengths (so dense
    slots and routed counts differ per row), and the caches it leaves: what the eager step
    gives. Decisions vary (some rows route, some do not, in the same step), and routed caches
    start with one spare slot, so they grow while decoding."""
    monkeypatch.setattr("modlm.generate.engine._ROUTED_HEADROOM", 1)
    eager, static = engine_for(kind), static_engine(kind)
    start = [c.slots for c in static.prefill(PROMPTS)[0].caches]
    e_state, e_logits, _ = teacher_forced(eager, PROMPTS, n_steps=9)
    s_state, s_logits, _ = teacher_forced(static, PROMPTS, n_steps=9)
    for a, b in zip(e_logits, s_logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert s_state.routed_tokens == e_state.routed_tokens
    assert s_state.cache_entries() == e_state.cache_entries()
    for ce, cs in zip(e_state.caches, s_state.caches):
        for b in range(len(PROMPTS)):
            n = int(ce.n_B[b])
            assert int(cs.n_B[b]) == n
            assert torch.equal(cs.pos_BC[b, :n], ce.pos_BC[b, :n])
            torch.testing.assert_close(cs.k_BHCd[b, :, :n], ce.k_BHCd[b, :, :n], atol=1e-6,
                                       rtol=0)
    if kind != "dense":
        counts = {int(c.n_B[b]) for c in s_state.caches if c.routed for b in range(3)}
        assert len(counts) > 1                         # rows really routed differently
        assert all(c.slots > n for c, n in zip(s_state.caches, start) if c.routed)


@pytest.mark.parametrize("kind", ["router", "predictor"])
def test_static_step_generates_the_eager_tokens_as_rows_finish(kind, monkeypatch):
    """Greedy generation with stop tokens (rows leave the batch at different steps, so the
    batch shrinks under the static step), routed caches started with one spare slot (so they
    grow while decoding)."""
    monkeypatch.setattr("modlm.generate.engine._ROUTED_HEADROOM", 1)
    eager, static = engine_for(kind), static_engine(kind)
    ref = eager.generate(PROMPTS, 30)
    stop = [ref.tokens[0][5]]
    a, b = eager.generate(PROMPTS, 30, stop_token_ids=stop), \
        static.generate(PROMPTS, 30, stop_token_ids=stop)
    assert b.tokens == a.tokens and b.finish_reasons == a.finish_reasons
    assert "stop_token" in a.finish_reasons and "length" in a.finish_reasons
    assert b.routed_fraction == a.routed_fraction and b.kv_cache_bytes == a.kv_cache_bytes
    assert b.kv_cache_allocated_bytes == a.kv_cache_allocated_bytes


def test_compile_refuses_what_it_cannot_compile():
    """Mixture-of-experts layers dispatch tokens with data-dependent shapes: refused at once,
    with the fix, rather than failing after the prefill."""
    moe = MoDLM(ModelConfig(**CFG, moe=dict(experts=4, layers="all"))).eval()
    with pytest.raises(GenerationError, match="mixture-of-experts.*compile=False"):
        Engine(moe, "router", compile=True)
    Engine(moe, "router")                                # the eager engine serves it


def test_rate_router_keeps_one_stream_of_draws(make_cfg, monkeypatch):
    """A RateRouter's draws continue where the last call stopped, whether that call ran inside
    a compiled graph or eagerly, and rewind() replays them."""
    from modlm.measure import route_at_rate
    model = MoDLM(make_cfg()).eval()
    router = route_at_rate(model, 0.5)[0]
    x = torch.randn(2, 3, model.cfg.d_model)
    first = router(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    second = router(x)                                   # the graph's form of the draw
    monkeypatch.undo()
    third = router(x)
    router.rewind()
    replay = torch.cat([router(x), router(x), router(x)])
    assert torch.equal(replay, torch.cat([first, second, third]))
    assert not torch.equal(first, second) and not torch.equal(second, third)
    assert torch.equal(torch.cat([first, second, third]).flatten(), router.draws[:18])


@pytest.mark.slow   # torch.compile builds each graph in about 10 s on 2 cores
def test_compiled_engines_generate_the_eager_tokens(monkeypatch):
    """Engine(compile=True) on a MoD model and on its dense twin of the same shapes, in one
    process: each generates what its eager engine generates (so neither runs the other's
    graph), greedily and sampling, with rows that stop early (the batch shrinks) and routed
    caches that grow, and its logits agree to rounding; and neither shrinking batches nor
    growing caches compile the step again (a compile costs 10 s or more)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr("modlm.generate.engine._ROUTED_HEADROOM", 1)
    for kind in ("dense", "router"):
        model = make_model(kind)
        eager, compiled = Engine(model, "router"), Engine(model, "router", compile=True)
        stop = [eager.generate(PROMPTS, 16).tokens[0][4]]
        graphs = []
        for temperature in (0.0, 1.0):
            a = eager.generate(PROMPTS, 16, temperature=temperature, seed=3, stop_token_ids=stop)
            b = compiled.generate(PROMPTS, 16, temperature=temperature, seed=3,
                                  stop_token_ids=stop)
            assert b.tokens == a.tokens and b.finish_reasons == a.finish_reasons
            assert b.routed_fraction == a.routed_fraction
            graphs.append(counters["stats"]["unique_graphs"])
            if temperature == 0.0:          # greedy: the first row stops early, the rest run on
                assert "stop_token" in a.finish_reasons and "length" in a.finish_reasons
        assert graphs[1] == graphs[0]       # the second generation compiled nothing new
        _, e_logits, _ = teacher_forced(eager, PROMPTS, n_steps=6)
        _, c_logits, _ = teacher_forced(compiled, PROMPTS, n_steps=6)
        for x, y in zip(e_logits, c_logits):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)
