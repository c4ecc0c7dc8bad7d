"""Retrofitting Hugging Face decoders into MoD models (modlm/hf/retrofit.py), offline, tiny configs.

Sizes are small and distinct (vocab 99, width 32, MLP 37, 2 query heads and 1 key/value head of
width 16, 4 layers, T 13) so a swapped dimension fails loudly; the trainer tests use vocab 256 so
modlm's byte tokenizer fits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from support import tiny_hf_model  # noqa: E402

from modlm.checkpoint import latest_checkpoint, load_model  # noqa: E402
from modlm.config import ConfigError, ModelConfig, RoutingConfig  # noqa: E402
from modlm.data import DataConfig  # noqa: E402
from modlm.hf.closeness import measure_closeness  # noqa: E402
from modlm.hf.retrofit import (  # noqa: E402
    MoDLayer,
    RetrofitConfig,
    RetrofitError,
    from_pretrained,
    load_hf_model,
    retrofit,
)
from modlm.train import TrainConfig, load_run_config, train  # noqa: E402

V, T = 99, 13


def hf_model(kind: str, impl: str = "sdpa", vocab: int = V, **kw) -> torch.nn.Module:
    """A tiny randomly initialised Hugging Face causal LM in eval mode."""
    return tiny_hf_model(kind, impl, vocab, **kw)


def ids(B: int = 3, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed))


KINDS_IMPLS = [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")]


# ---- starting where the original model is ------------------------------------------------------

@pytest.mark.parametrize("kind,impl", KINDS_IMPLS + [("mistral", "sdpa"), ("qwen2", "eager"),
                                                     ("qwen3", "sdpa")])
def test_capacity_one_reproduces_the_original_logits(kind, impl):
    original = hf_model(kind, impl)
    x_BT = ids()
    with torch.no_grad():
        ref_BTV = original(x_BT).logits
    model = retrofit(copy.deepcopy(original), RoutingConfig(capacity=1.0)).eval()
    assert [l.index for l in model.routed_layers()] == [1, 3]   # every other layer
    with torch.no_grad():
        out_BTV = model(x_BT).logits_BTV
        dense_BTV = model.original_logits(x_BT)
    torch.testing.assert_close(out_BTV, ref_BTV, rtol=0, atol=1e-5)
    torch.testing.assert_close(dense_BTV, ref_BTV, rtol=0, atol=1e-6)
    # the knob matters: at capacity 0.5 half the tokens skip layers 1 and 3
    half = retrofit(copy.deepcopy(original), RoutingConfig(capacity=0.5)).eval()
    with torch.no_grad():
        assert (half(x_BT).logits_BTV - ref_BTV).abs().max() > 1e-3


def test_without_identity_init_the_plain_sigmoid_weight_moves_the_outputs():
    original = hf_model("llama")
    x_BT = ids()
    exact = measure_closeness(retrofit(copy.deepcopy(original), RoutingConfig(capacity=1.0)),
                              torch.cat([x_BT, x_BT[:, :1]], 1))
    halved = measure_closeness(retrofit(copy.deepcopy(original), RoutingConfig(capacity=1.0),
                                        identity_init=False),
                               torch.cat([x_BT, x_BT[:, :1]], 1))
    assert exact.max_abs_logit_diff < 1e-5 and exact.top1_agreement == 1.0
    assert halved.max_abs_logit_diff > 100 * exact.max_abs_logit_diff + 1e-3


def test_every_pretrained_weight_is_kept_under_its_name():
    original = hf_model("llama")
    model = retrofit(copy.deepcopy(original))
    state = model.state_dict()
    for name, value in original.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) in (1, 3):
            parts.insert(3, "layer")              # the routed layer wraps the original
        assert torch.equal(state["hf." + ".".join(parts)], value), name
    added = sorted(k for k in state if k.removeprefix("hf.") not in original.state_dict()
                   and ".layer." not in k)
    assert added == sorted(f"hf.model.layers.{i}.{p}" for i in (1, 3)
                           for p in ("gain", "router.weight", "predictor.fc.weight",
                                     "predictor.head.weight"))


# ---- routed layers compute only their tokens ---------------------------------------------------

@pytest.mark.parametrize("kind,impl", KINDS_IMPLS)
def test_routed_layers_process_only_their_tokens_and_skipped_ones_pass_bit_for_bit(kind, impl):
    model = retrofit(hf_model(kind, impl), RoutingConfig(capacity=0.25)).eval()
    seen, io, positions = {}, {}, []
    for layer in model.routed_layers():
        first = layer.layer.attn.c_attn if kind == "gpt2" else layer.layer.self_attn.q_proj
        first.register_forward_pre_hook(
            lambda m, args, i=layer.index: seen.__setitem__(i, args[0]))
        layer.register_forward_hook(
            lambda m, args, kwargs, out, i=layer.index: io.__setitem__(i, (args[0], out[0])),
            with_kwargs=True)
    encode = model.encode_positions

    def spy(pos):   # the positions a routed layer's tokens are encoded at
        positions.append(pos)
        return encode(pos)

    model.encode_positions = spy
    B, k = 3, 3   # floor(0.25 * 13)
    with torch.no_grad():
        out = model(ids(B))
    full_cos = None
    if kind == "llama":
        pos = torch.arange(T).expand(B, T)
        full_cos = model.hf.model.rotary_emb(torch.zeros(1), position_ids=pos)[0]
    assert len(positions) == len(out.routing) == 2
    for s, pos_BK in zip(out.routing, positions):
        assert seen[s.layer].shape == (B, k, 32)               # only the routed tokens
        idx_BK = s.mask_BT.nonzero()[:, 1].view(B, k)         # in time order
        assert torch.equal(pos_BK, idx_BK)                     # their true positions, not 0..k-1
        if kind == "llama":
            cos = encode(pos_BK)[0]
            assert torch.equal(cos, torch.gather(full_cos, 1, idx_BK[..., None].expand(-1, -1, 16)))
        x_in, x_out = io[s.layer]
        assert torch.equal(x_out[~s.mask_BT], x_in[~s.mask_BT])
        assert not torch.equal(x_out[s.mask_BT], x_in[s.mask_BT])
        assert int(s.mask_BT.sum()) == B * k


def test_gradients_reach_the_router_gain_and_predictor():
    model = retrofit(hf_model("gpt2"), RoutingConfig(capacity=0.5)).train()
    x_BT = ids(length=T + 1)
    out = model(x_BT[:, :-1], x_BT[:, 1:])
    out.lm_loss.backward(retain_graph=True)
    for layer in model.routed_layers():
        # The LM loss reaches the gain; with the gain at 0 the router vector gets none from it yet.
        assert float(layer.gain.grad.abs()) > 0
        assert float(layer.router.weight.grad.abs().sum()) == 0.0
        assert layer.predictor.fc.weight.grad is None
    model.zero_grad()
    out.loss.backward()   # + the auxiliary BCE and the predictor loss
    for layer in model.routed_layers():
        assert float(layer.router.weight.grad.abs().sum()) > 0
        assert float(layer.predictor.fc.weight.grad.abs().sum()) > 0
    # modlm's plain weight sigmoid(r): the LM loss reaches the router vector directly
    plain = retrofit(hf_model("gpt2"), RoutingConfig(capacity=0.5), identity_init=False)
    plain(x_BT[:, :-1], x_BT[:, 1:]).lm_loss.backward()
    assert all(float(l.router.weight.grad.abs().sum()) > 0 for l in plain.routed_layers())


# ---- causal modes, padding, generation ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["router", "predictor"])
def test_causal_modes_do_not_look_ahead(mode):
    model = retrofit(hf_model("llama"), RoutingConfig(capacity=0.25)).eval()
    a_BT = ids(2)
    topk_leaked = False
    with torch.no_grad():
        a, ta = model(a_BT, mode=mode), model(a_BT, mode="topk")
        assert all(0 < float(s.fraction) < 1 for s in a.routing)   # some routed, some skipped
        for shift in range(1, 12):
            b_BT = a_BT.clone()
            b_BT[:, 9:] = (b_BT[:, 9:] + shift) % V
            b = model(b_BT, mode=mode)
            torch.testing.assert_close(a.logits_BTV[:, :9], b.logits_BTV[:, :9], rtol=0, atol=1e-6)
            tb = model(b_BT, mode="topk")
            topk_leaked |= bool((ta.logits_BTV[:, :9] - tb.logits_BTV[:, :9]).abs().max() > 1e-4)
    # top-k is not causal: some future changes which past tokens are routed, and their logits
    assert topk_leaked


@pytest.mark.parametrize("kind,impl", [("llama", "sdpa"), ("gpt2", "eager")])
@pytest.mark.parametrize("mode", ["topk", "router", "predictor"])
def test_a_padded_batch_equals_its_rows_alone(kind, impl, mode):
    model = retrofit(hf_model(kind, impl), RoutingConfig(capacity=0.25)).eval()
    lengths = [13, 9, 5]
    rows = [ids(1, n, seed=n) for n in lengths]
    with torch.no_grad():
        alone = [model(r, mode=mode).logits_BTV[0] for r in rows]
        for side in ("left", "right"):
            x_BT = torch.zeros(3, 13, dtype=torch.long)
            mask_BT = torch.zeros(3, 13, dtype=torch.long)
            for b, (r, n) in enumerate(zip(rows, lengths)):
                span = slice(13 - n, 13) if side == "left" else slice(0, n)
                x_BT[b, span], mask_BT[b, span] = r[0], 1
            out = model(x_BT, mode=mode, attention_mask_BT=mask_BT)
            for b, n in enumerate(lengths):
                span = slice(13 - n, 13) if side == "left" else slice(0, n)
                torch.testing.assert_close(out.logits_BTV[b, span], alone[b], rtol=0, atol=1e-5)
                assert not out.routing[0].mask_BT[b][mask_BT[b] == 0].any()   # padding skipped
            assert torch.isfinite(out.logits_BTV).all()


def test_generate_left_padded_batch_equals_rows_alone_and_hf_forward_fails_clearly():
    model = retrofit(hf_model("llama"), RoutingConfig(capacity=0.25)).eval()
    a, b = ids(1, 7, seed=3), ids(1, 4, seed=4)
    x_BT = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask_BT = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    both = model.generate(x_BT, 5, mode="router", attention_mask_BT=mask_BT)
    assert torch.equal(both[0], model.generate(a, 5, mode="router")[0])
    assert torch.equal(both[1, 3:], model.generate(b, 5, mode="router")[0])
    with pytest.raises(RetrofitError, match="not causal"):
        model.generate(a, 2, mode="topk")
    # Hugging Face's own forward would run the routed layers without routing inputs: refused.
    with pytest.raises(RetrofitError, match="retrofitted with a Mixture-of-Depths router"):
        model.hf(a)
    with pytest.raises(RetrofitError, match=r"modlm.hf.from_modlm\(retrofitted\).generate"):
        model.hf.generate(a, max_new_tokens=2, do_sample=False)


# ---- errors ------------------------------------------------------------------------------------

def test_bad_inputs_get_clear_errors(tmp_path):
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37))
    with pytest.raises(RetrofitError, match=r"type 'bert'.*supported are"):
        retrofit(bert)
    with pytest.raises(ConfigError, match=r"capacity must be in \(0, 1\], got 1.5"):
        retrofit(hf_model("llama"), RoutingConfig(capacity=1.5))
    with pytest.raises(RetrofitError, match=r"layer indices \[7\] outside 0..3"):
        retrofit(hf_model("llama"), RoutingConfig(layers=(1, 7)))
    with pytest.raises(RetrofitError, match="'flash_attention_2' is not supported"):
        retrofit(hf_model("llama", "flash_attention_2"))
    model = retrofit(hf_model("gpt2"))
    with pytest.raises(RetrofitError, match="already retrofitted"):
        retrofit(model.hf)
    with pytest.raises(ValueError, match=r"token ids must be in 0..98"):
        model(torch.full((1, 4), V))
    with pytest.raises(ValueError, match=r"sequence length 49 must be in 1..max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask_BT must hold 1"):
        model(ids(1), attention_mask_BT=torch.full((1, T), 2))
    windowed = retrofit(hf_model("mistral", sliding_window=8))
    with pytest.raises(RetrofitError, match="sliding attention window"):
        windowed(ids(1))
    with pytest.raises(RetrofitError, match="no config.json"):
        load_hf_model(tmp_path)
    with pytest.raises(ConfigError, match="attn_implementation must be one of"):
        RetrofitConfig(source="x", attn_implementation="flash_attention_2")


def test_a_saved_folder_loads_offline_with_the_chosen_attention(tmp_path):
    original = hf_model("gpt2", "sdpa")
    original.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf", RoutingConfig(capacity=1.0),
                            attn_implementation="eager").eval()
    assert model.hf.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits_BTV, original(ids()).logits,
                                   rtol=0, atol=1e-5)


# ---- modlm's trainer ---------------------------------------------------------------------------

@pytest.fixture
def hf_run(tmp_path: Path):
    """A corpus and a saved tiny Hugging Face model with a byte vocabulary; returns a config
    factory for a short retrofit training run."""
    words = ["the", "router", "picks", "tokens", "and", "layers", "skip", "others", "quickly"]
    lines = [" ".join(words[(i * j) % len(words)] for j in range(1, 12)) for i in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))

    def make(kind: str, **kw) -> TrainConfig:
        folder = tmp_path / f"hf-{kind}"
        if not folder.exists():
            hf_model(kind, vocab=256).save_pretrained(folder)
        data = DataConfig(corpus=str(tmp_path / "corpus.txt"), seq_len=32,
                          cache_dir=str(tmp_path / "cache"), val_fraction=0.1,
                          tokenizer=kw.pop("tokenizer", "bytes"))
        base = dict(model=ModelConfig(routing=RoutingConfig(capacity=0.25)), data=data, steps=6,
                    batch_size=4, lr=1e-2, warmup_steps=1, eval_every=3, eval_batches=1,
                    checkpoint_every=3, log_every=1, device="cpu",
                    out_dir=str(tmp_path / "runs"), run_name=kind,
                    retrofit=RetrofitConfig(source=str(folder)))
        base.update(kw)
        return TrainConfig(**base)

    return make


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "eval" not in r}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_lowers_the_loss_resumes_exactly_and_evaluates(hf_run, kind):
    full = train(hf_run(kind))
    losses = _losses(full.run_dir)
    assert sorted(losses) == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[6] < losses[1] - 0.5
    saved = json.loads((full.run_dir / "config.json").read_text())
    assert saved["retrofit"]["hf_config"]["model_type"] == kind
    assert saved["model"]["n_layers"] == 4 and saved["model"]["d_model"] == 32
    ev = full.final_eval["val"]
    assert set(ev) == {"topk", "router", "predictor"}
    assert [l["layer"] for l in ev["topk"]["layers"]] == [1, 3]
    assert all(l["fraction_routed"] == pytest.approx(0.25) for l in ev["topk"]["layers"])

    # Resume from step 3 without the source folder: the recorded config rebuilds the model.
    part = full.run_dir.with_name(f"{kind}-part")
    shutil.copytree(full.run_dir, part)
    shutil.rmtree(latest_checkpoint(part))
    shutil.rmtree(Path(hf_run(kind).retrofit.source))
    resumed = train(load_run_config(part), resume=part)
    assert resumed.step == 6 and _losses(part) == losses

    # A checkpoint loads back as the retrofitted model with the trained weights.
    model, loaded = load_model(full.run_dir)
    assert type(model).__name__ == "RetrofitLM" and loaded.step == 6
    assert any(float(l.gain.detach().abs()) > 0 for l in model.routed_layers())
    assert isinstance(model.routed_layers()[0], MoDLayer)


def test_trainer_refuses_mismatched_vocabularies_and_fsdp(hf_run, tmp_path):
    small = tmp_path / "hf-small-vocab"
    hf_model("llama", vocab=V).save_pretrained(small)
    with pytest.raises(ConfigError, match="tokenizer has 256 ids but the Hugging Face model "
                                          "embeds 99"):
        train(hf_run("llama", retrofit=RetrofitConfig(source=str(small))))
    with pytest.raises(ConfigError, match="fsdp=true shards modlm's own blocks"):
        hf_run("llama", fsdp=True)
    with pytest.raises(ConfigError, match="data.seq_len \\(64\\) exceeds the Hugging Face "
                                          "model's 48 positions"):
        cfg = hf_run("llama")
        train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=64)))


def test_cli_retrofit_reports_how_far_the_outputs_move(tmp_path, capsys):
    from modlm.cli import main
    hf_model("gpt2", vocab=256).save_pretrained(tmp_path / "hf")
    assert main(["retrofit", str(tmp_path / "hf"), "--set", "capacity=0.25", "--seq-len", "16",
                 "--windows", "2", "--attn-implementation", "eager"]) == 0
    rows = {float(line.split()[0]): [float(v) for v in line.split()[2:]]
            for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("1", "0.25")}
    assert rows[1.0][0] < 1e-5 and rows[1.0][4] == 1.0        # capacity 1: the original
    assert rows[0.25][0] > 1e-3                                # 4 of 16 tokens per routed layer
    assert main(["retrofit", str(tmp_path), "--windows", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_a_dense_routing_config_drives_the_unpatched_model():
    original = hf_model("qwen2", "sdpa")
    model = retrofit(copy.deepcopy(original), RoutingConfig(router="none", predictor=False,
                                                            aux_loss_weight=0.0))
    assert model.routed_layers() == [] and model.cfg.is_dense
    x_BT = ids(2)
    with torch.no_grad():
        out = model(x_BT, x_BT)
        torch.testing.assert_close(out.logits_BTV, original(x_BT).logits, rtol=0, atol=1e-6)
    assert out.routing == () and out.router_aux_loss is None and out.loss == out.lm_loss


# ---- the model's own tokenizer -----------------------------------------------------------------

def _hf_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE trained here, offline, as a transformers tokenizer with an eos token."""
    import tokenizers
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def test_a_retrofit_run_trains_evaluates_and_samples_with_the_models_own_tokenizer(
        hf_run, tmp_path, capsys):
    from modlm.cli import main
    from modlm.tokenizer import PretrainedTokenizer
    corpus = (tmp_path / "corpus.txt").read_text()
    tok = _hf_tokenizer(corpus, 300)
    n = len(tok)
    assert 257 < n <= 300          # merges were learned: not a byte vocabulary
    folder = tmp_path / "hf-own-tokenizer"
    hf_model("llama", vocab=n).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = hf_run("llama", retrofit=RetrofitConfig(source=str(folder)), run_name="own",
                 tokenizer="auto")
    assert cfg.data.tokenizer == "auto"           # resolved when the run starts
    result = train(cfg)
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["data"]["tokenizer"] == "hf"
    # saved with the run and every checkpoint, and it is the source's tokenizer
    model, loaded = load_model(result.run_dir)
    assert isinstance(loaded.tokenizer, PretrainedTokenizer)
    text = "the router picks tokens"
    assert loaded.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False)
    assert len(loaded.tokenizer.encode(text)) < len(text.encode())
    assert (latest_checkpoint(result.run_dir) / "tokenizer" / "tokenizer.json").is_file()
    ev = result.final_eval["val"]["router"]
    # bits per byte are per UTF-8 byte: loss / ln 2 / (bytes per token), with > 1 byte a token
    assert 0 < ev["bpb"] < ev["loss"] / math.log(2)
    # and it samples from the run, decoding with the model's own tokenizer
    capsys.readouterr()
    assert main(["sample", str(result.run_dir), "--prompt", "the router", "--max-new-tokens",
                 "6", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the router") and len(captured.out) > len("the router")
    assert "routed per block: 1:" in captured.err

    # A tokenizer larger than the model's embedding is refused with the fix.
    small = tmp_path / "hf-small"
    hf_model("llama", vocab=n - 20).save_pretrained(small)
    tok.save_pretrained(small)
    with pytest.raises(ConfigError, match=f"tokenizer has {n} ids but the Hugging Face model "
                                          f"embeds {n - 20}"):
        train(hf_run("llama", retrofit=RetrofitConfig(source=str(small)), run_name="small",
                     tokenizer="auto"))
    # "auto" refuses a source folder without a tokenizer rather than feed it byte ids.
    bare = tmp_path / "hf-bare"
    hf_model("llama", vocab=256).save_pretrained(bare)
    with pytest.raises(ConfigError, match="holds no Hugging Face tokenizer"):
        train(hf_run("llama", retrofit=RetrofitConfig(source=str(bare)), run_name="bare",
                     tokenizer="auto"))
    assert not (tmp_path / "runs" / "bare").exists()     # nothing written
    # The CLI's presets leave "auto" for the run to resolve.
    from modlm.train import configure
    assert configure("small", {"retrofit.source": str(folder)}).data.tokenizer == "auto"


def test_a_models_tokenizer_never_truncates_or_pads_the_corpus(tmp_path):
    from modlm.tokenizer import PretrainedTokenizer, load_tokenizer
    text = " ".join(["the router picks tokens and layers skip others"] * 40)
    tok = _hf_tokenizer(text, 280)
    tok.backend_tokenizer.enable_truncation(16)       # saved in tokenizer.json
    tok.backend_tokenizer.enable_padding(length=64)
    tok.save_pretrained(tmp_path / "tok")
    assert len(tok.backend_tokenizer.encode(text).ids) == 64      # cut to 16, padded to 64
    ours = PretrainedTokenizer.from_folder(tmp_path / "tok")
    ids = ours.encode_array(text)
    assert len(ids) > 100 and ours.decode(ids.tolist()) == text
    again = load_tokenizer(ours.save(tmp_path / "saved"))     # as a run folder stores it
    assert isinstance(again, PretrainedTokenizer) and again.identity == ours.identity
    assert again.encode(text) == ids.tolist()
