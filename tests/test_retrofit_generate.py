"""Retrofitted Hugging Face models generate through modlm's engine (modlm/generate/) with the
token-skipping KV cache: prefill + decode equals the retrofit's full causal forward, routed caches
hold exactly the routed tokens, decode runs a routed layer only for routed rows, and the wrapped
decoder layers compute what Hugging Face's own layers compute.

Offline, tiny random models (tests/support.py `tiny_hf_model`), float32.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from support import decode_routed_row_counts, teacher_forced, tiny_hf_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from modlm.config import RoutingConfig  # noqa: E402
from modlm.generate import Engine, GenerationError  # noqa: E402
from modlm.hf.retrofit import MoDLayer, retrofit  # noqa: E402

V = 99
PROMPTS = [[5, 17, 3, 88, 41, 2, 60], [9, 30], [71, 4, 4, 12, 90, 33, 8, 51, 26, 19, 77]]
# Grouped-query attention with 3 query heads per key/value head, head width 8 != width / heads.
GQA = dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
KINDS = {"llama": ("llama", {}), "llama-gqa": ("llama", GQA), "mistral": ("mistral", {}),
         "qwen2": ("qwen2", {}), "qwen3": ("qwen3", GQA), "gpt2": ("gpt2", {}),
         "gpt2-scaled": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True))}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest's `one_thread`)."""


def retrofitted(kind: str, capacity: float = 0.5, seed: int = 0, **routing):
    """A retrofitted tiny model whose routers and predictors are scaled so decisions vary."""
    family, kw = KINDS[kind]
    torch.manual_seed(seed)
    model = retrofit(tiny_hf_model(family, vocab=V, perturb=True, **kw),
                     RoutingConfig(capacity=capacity, **routing)).eval()
    with torch.no_grad():
        for layer in model.routed_layers():
            layer.router.weight.mul_(3.0)
            if layer.predictor is not None:
                layer.predictor.head.weight.normal_(0.0, 3.0)
            if layer.gain is not None:
                layer.gain.fill_(0.7)     # trained-looking weights: not exactly 1 everywhere
    return model


def full_forward(model, ids: list[int], mode: str):
    with torch.no_grad():
        return model(torch.tensor([ids]), mode=mode)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["router", "predictor"])
def test_prefill_and_decode_equal_the_full_causal_forward(kind, mode):
    model = retrofitted(kind)
    engine = Engine(model, mode)
    state, logits, full = teacher_forced(engine, PROMPTS, n_steps=9)
    routed = [l.index for l in model.routed_layers()]
    assert routed == [1, 3]
    for b, ids in enumerate(full):
        ref = full_forward(model, ids, mode)
        assert logits[b].shape == ref.logits_BTV[0].shape
        torch.testing.assert_close(logits[b], ref.logits_BTV[0], atol=1e-5, rtol=0)
        for layer, stats in zip(routed, ref.routing):
            assert 0.0 < float(stats.fraction) < 1.0        # routing really varies
            # the cache of a routed layer holds exactly the tokens that layer routed
            want = stats.mask_BT[0].nonzero().squeeze(-1)
            n = int(state.caches[layer].n_B[b])
            assert state.caches[layer].pos_BC[b, :n].tolist() == want.tolist()
        for layer in (0, 2):
            assert int(state.caches[layer].n_B[b]) == len(ids)


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_threshold_routing_on_a_retrofitted_model_decodes_like_its_training_forward(kind):
    """A threshold router routes a retrofitted layer by its own causal rule in every mode: the
    cached decode gives the training ("topk") forward's logits, and each routed cache holds the
    tokens that forward routed."""
    model = retrofitted(kind, router="threshold", predictor=False, aux_loss_weight=1.0)
    engine = Engine(model, "router")
    state, logits, full = teacher_forced(engine, PROMPTS, n_steps=9)
    for b, ids in enumerate(full):
        ref = full_forward(model, ids, "topk")
        torch.testing.assert_close(logits[b], ref.logits_BTV[0], atol=1e-5, rtol=0)
        for layer, stats in zip((1, 3), ref.routing):
            assert 0.0 < float(stats.fraction) < 1.0
            n = int(state.caches[layer].n_B[b])
            assert state.caches[layer].pos_BC[b, :n].tolist() == (
                stats.mask_BT[0].nonzero().squeeze(-1).tolist())


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_greedy_generation_equals_recomputing_the_full_forward(kind):
    model = retrofitted(kind)
    result = Engine(model, "router").generate(PROMPTS, 8)
    for b, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for _ in range(8):
            seq.append(int(full_forward(model, seq, "router").logits_BTV[0, -1].argmax()))
        assert list(result.tokens[b]) == seq[len(prompt):]
    assert set(result.routed_fraction) == {1, 3}
    assert all(0.0 < f < 1.0 for f in result.routed_fraction.values())
    assert 0 < result.kv_cache_bytes < result.dense_kv_cache_bytes
    # RetrofitLM.generate is the same engine
    ids = torch.tensor([PROMPTS[0]])
    out = model.generate(ids, 8, mode="router")
    assert out[0, len(PROMPTS[0]):].tolist() == list(result.tokens[0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_wrapped_layers_compute_what_hugging_face_layers_compute(kind):
    """With no routed layer the engine drives every original layer step by step (projections,
    rotary, grouped-query attention over its cache, MLP): it must reproduce the original
    model's own logits at every position."""
    family, kw = KINDS[kind]
    torch.manual_seed(0)
    original = tiny_hf_model(family, vocab=V, perturb=True, **kw)
    model = retrofit(copy.deepcopy(original), RoutingConfig(router="none"))
    _, logits, full = teacher_forced(Engine(model, "router"), PROMPTS, n_steps=4)
    for b, ids in enumerate(full):
        with torch.no_grad():
            ref = original(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits[b], ref, atol=1e-5, rtol=0)


def test_decode_runs_a_routed_layer_only_for_the_rows_whose_token_routes():
    model = retrofitted("llama-gqa")
    engine = Engine(model, "router")
    state, _ = engine.prefill(PROMPTS)
    calls = {l.index: [] for l in model.routed_layers()}
    for layer in model.routed_layers():
        layer.layer.mlp.register_forward_pre_hook(
            lambda m, args, i=layer.index: calls[i].append(args[0].shape[0]))
    cont = torch.randint(0, V, (len(PROMPTS), 10), generator=torch.Generator().manual_seed(3))
    refs = [full_forward(model, p + cont[b].tolist(), "router").routing
            for b, p in enumerate(PROMPTS)]
    assert len(decode_routed_row_counts(engine, state, calls, refs, PROMPTS, cont)) > 1


def test_batch_rows_generate_what_they_generate_alone_with_sampling():
    model = retrofitted("qwen3")
    engine = Engine(model, "predictor")
    batch = engine.generate(PROMPTS, 6, temperature=1.0, seed=[1, 2, 3])
    for b, prompt in enumerate(PROMPTS):
        assert engine.generate([prompt], 6, temperature=1.0, seed=[b + 1]).tokens[0] \
            == batch.tokens[b]


def test_sliding_window_models_generate_within_their_window():
    torch.manual_seed(0)
    model = retrofit(tiny_hf_model("mistral", vocab=V, sliding_window=16),
                     RoutingConfig(capacity=0.5)).eval()
    engine = Engine(model, "router")
    assert engine.context == 16
    with pytest.raises(GenerationError, match="attention window"):
        engine.generate([list(range(10))], 8)
    result = engine.generate([list(range(10))], 8, truncate=True)
    assert result.finish_reasons == ("context",) and len(result.tokens[0]) == 6


def test_retrofit_layers_refuse_hugging_face_forward_with_the_way_out():
    model = retrofitted("llama")
    assert isinstance(model.hf.model.layers[1], MoDLayer)
    with pytest.raises(Exception, match="from_modlm"):
        model.hf(torch.tensor([PROMPTS[0]]))


# ---- Hugging Face generate on a retrofitted model ----------------------------------------------

def _left_pad(prompts):
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_hugging_face_generate_on_a_retrofitted_model_is_the_engine(kind):
    from transformers.generation.streamers import BaseStreamer

    from modlm.hf.modeling import ModLMCache, from_modlm
    model = retrofitted(kind)
    wrapper = from_modlm(model).eval()
    ids, mask = _left_pad(PROMPTS)
    out = wrapper.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:].tolist()
    assert new == [list(t) for t in Engine(model, "router").generate(PROMPTS, 6).tokens]
    cache = out.past_key_values
    assert isinstance(cache, ModLMCache)
    entries = cache.block_entries()
    assert entries[1] < entries[0] and entries[3] < entries[2]    # routed layers skip tokens
    assert all(0.0 < f < 1.0 for f in cache.routed_fraction().values())

    # sampling: reproducible with a seed, top_k=1 is greedy; a streamer sees every token
    def sample(seed, **kw):
        torch.manual_seed(seed)
        return wrapper.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                temperature=1.5, **kw)[:, ids.shape[1]:].tolist()

    assert sample(0) == sample(0) and sample(3, top_k=1) == new

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            pass

    streamer = Collect()
    wrapper.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6, do_sample=False,
                     streamer=streamer)
    assert [p[0] for p in streamer.puts[1:]] == new[0]


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_a_saved_retrofitted_model_loads_and_generates_identically(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from modlm import hf
    from modlm.hf.modeling import from_modlm
    model = retrofitted(kind)
    wrapper = from_modlm(model).eval()
    wrapper.save_pretrained(tmp_path / "out")
    hf.register()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again.model).__name__ == "RetrofitLM"
    ids, mask = _left_pad(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                                   wrapper(ids, attention_mask=mask).logits, rtol=0, atol=0)
    a = wrapper.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    b = again.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


# ---- what must not go silently wrong -----------------------------------------------------------

def test_sampling_with_a_generator_and_refusing_dropout_in_training_mode():
    model = retrofitted("gpt2")
    ids = torch.tensor([PROMPTS[0]])
    a = model.generate(ids, 6, mode="router", temperature=1.0,
                       generator=torch.Generator().manual_seed(5))
    b = model.generate(ids, 6, mode="router", temperature=1.0,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(Exception, match="left-padded"):
        model.generate(torch.tensor([[5, 6, 0]]), 2, attention_mask_BT=torch.tensor([[1, 1, 0]]))
    # GPT-2 has dropout: generating in training mode would be random, so it is refused
    torch.manual_seed(0)
    trainable = retrofit(tiny_hf_model("gpt2", vocab=V, attn_pdrop=0.1, resid_pdrop=0.1),
                         RoutingConfig(capacity=0.5))
    assert not trainable.training            # follows the loaded model's mode (eval)
    with pytest.raises(GenerationError, match="model.eval"):
        Engine(trainable.train(), "router")
    Engine(trainable.eval(), "router").generate(PROMPTS, 2)


def test_hugging_face_generate_on_a_sliding_window_model_stays_in_the_window():
    from modlm.hf.modeling import ModLMCache, from_modlm
    torch.manual_seed(0)
    model = retrofit(tiny_hf_model("mistral", vocab=V, sliding_window=16),
                     RoutingConfig(capacity=0.5)).eval()
    wrapper = from_modlm(model).eval()
    ids = torch.tensor([list(range(1, 11))])
    out = wrapper.generate(ids, max_new_tokens=6, do_sample=False, cache=ModLMCache())
    assert out.shape == (1, 16)
    with pytest.raises(GenerationError, match="attention window"):
        wrapper.generate(ids, max_new_tokens=8, do_sample=False)   # 17 tokens fed > 16


def test_a_bfloat16_retrofit_generates_through_the_cache():
    model = retrofitted("llama-gqa").to(torch.bfloat16)
    result = Engine(model, "router").generate(PROMPTS, 5)
    assert all(len(t) == 5 and all(0 <= i < V for i in t) for t in result.tokens)
    assert 0 < result.kv_cache_bytes < result.dense_kv_cache_bytes
    # keys and values are cached in the model's dtype: 2 bytes per value
    assert result.kv_cache_allocated_bytes % 2 == 0


@pytest.mark.parametrize("kind,mode,skip", [("llama-gqa", "router", "block"),
                                            ("qwen3", "predictor", "attention"),
                                            ("gpt2", "predictor", "block")])
def test_static_step_equals_the_eager_step_on_retrofitted_models(kind, mode, skip):
    """The compiled engine's static-shape step (modlm/generate/static.py), run uncompiled, on
    retrofitted Hugging Face layers: grouped-query attention (its own attention over the cache
    and the new key), attention-only routing, GPT-2's positions in the embeddings. Every logit
    of prefill + teacher-forced decode equals the eager step's."""
    torch._dynamo.reset()   # eager torch.cond keeps a wrapper per process; other models' shapes
    model = retrofitted(kind, skip=skip)
    eager, static = Engine(model, mode), Engine(model, mode)
    static.compiled, static._static_fn = True, static._static
    e_state, e_logits, _ = teacher_forced(eager, PROMPTS, n_steps=9)
    s_state, s_logits, _ = teacher_forced(static, PROMPTS, n_steps=9)
    for a, b in zip(e_logits, s_logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert s_state.routed_tokens == e_state.routed_tokens
    assert 0 < s_state.routed_tokens[1] < s_state.seen_tokens[1]     # routing varied
    torch._dynamo.reset()
