"""modlm models as Hugging Face models: save/load, generate through the routed KV cache, tokenizer
export, and the dense model's parity with Hugging Face Llama.

Offline (HF_HUB_OFFLINE=1), tiny configs from conftest (vocab 99, d 32, 4 blocks, routed blocks
1 and 3). Weights start at std 0.5 so untrained models produce varied tokens (at std 0.02 greedy
decoding repeats one token and would hide a wrong step).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from support import needs_gpt2_files, needs_tokenizers, needs_transformers, snapshot

from modlm.generate import Engine, GenerationError
from modlm.model import MoDLM
from modlm.presets import dense

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = needs_transformers

if importlib.util.find_spec("transformers") is not None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.generation.streamers import BaseStreamer

    from modlm import hf
    from modlm.hf.llama import from_llama, rope_permutation, to_llama
    from modlm.hf.modeling import ModLMCache, ModLMConfig, ModLMForCausalLM, from_modlm
    from modlm.hf.tokenizer import save_hf_tokenizer

PROMPTS = [[5, 17, 33, 2, 91, 40, 7], [11, 3], [60, 61, 62, 63]]
NEW = 8


def mod_model(**overrides) -> MoDLM:
    torch.manual_seed(0)
    return MoDLM(tiny_config(init_std=0.5, **overrides)).eval()


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def generate(wrapper, prompts, **kwargs):
    ids, mask = left_pad(prompts)
    kwargs.setdefault("max_new_tokens", NEW)
    kwargs.setdefault("do_sample", False)
    out = wrapper.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    return out, out.sequences[:, ids.shape[1]:].tolist()


# ---- packaging and config ----------------------------------------------------------------------


def test_importing_modlm_does_not_import_transformers():
    code = ("import sys, modlm, modlm.model, modlm.generate, modlm.hf; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_mirrors_the_modlm_config_and_refuses_contradictions():
    cfg = tiny_config()
    config = ModLMConfig(modlm=cfg.to_dict())
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.max_position_embeddings) == (99, 32, 4, 2, 32)
    assert config.model_config() == cfg
    with pytest.raises(ValueError, match="vocab_size=500 contradicts modlm.vocab_size=99"):
        ModLMConfig(modlm=cfg.to_dict(), vocab_size=500)
    with pytest.raises(ValueError, match="'topk' is not causal"):
        ModLMConfig(modlm=cfg.to_dict(), routing_mode="topk")


# ---- save / load -------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, tied):
    model = mod_model(tie_embeddings=tied)
    wrapper = from_modlm(model)
    wrapper.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    expected = {f"model.{k}" for k in model.state_dict()}
    # The knob: a tied head is stored once (as the embedding), an untied one separately.
    assert stored == (expected - {"model.lm_head.weight"} if tied else expected)

    hf.register()
    hf.register()   # idempotent
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, ModLMForCausalLM) and not loaded.training
    assert (loaded.model.lm_head.weight is loaded.model.embed.weight) == tied
    ids = torch.randint(0, 99, (3, 17))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, wrapper(ids).logits)
        assert torch.equal(loaded(ids).logits, model(ids, mode="router").logits_BTV)
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("routing, mode", [
    (dict(router="threshold", predictor=False, aux_loss_weight=1.0), "router"),
    (dict(router="attention", aux_loss_weight=0.0), "predictor"),
    (dict(capacity=0.25, kv_capacity=0.5), "predictor"),
    (dict(capacity=0.25, kv_capacity=0.5), "router")])
def test_routers_beyond_the_papers_export_and_generate_like_the_engine(tmp_path, routing, mode):
    """Threshold, A-MoD and decoupled key/value models: saved and loaded through
    transformers with every weight, the same causal-mode logits, and greedy `generate` gives the
    engine's tokens."""
    model = mod_model(routing=routing)
    from_modlm(model, mode).save_pretrained(tmp_path)
    hf.register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.cfg.routing == model.cfg.routing
    ids = torch.randint(0, 99, (3, 17))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids, mode=mode).logits_BTV)
    _, tokens = generate(loaded, PROMPTS)
    assert tokens == [list(t) for t in Engine(model, mode).generate(PROMPTS, NEW).tokens]


def test_from_pretrained_refuses_a_missing_weight(tmp_path):
    from safetensors.torch import load_file, save_file
    from_modlm(mod_model()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.blocks.1.router.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.blocks.1.router.weight"):
        ModLMForCausalLM.from_pretrained(tmp_path)


# ---- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["router", "predictor"])
def test_greedy_generate_equals_the_engine_token_for_token(mode):
    model = mod_model()
    out, tokens = generate(from_modlm(model, mode), PROMPTS)
    expected = Engine(model, mode).generate(PROMPTS, NEW)
    assert tokens == [list(t) for t in expected.tokens]
    assert len({tuple(t) for t in tokens}) == len(PROMPTS) and len(set(tokens[0])) > 2
    # Routing was not trivial, and the cache routed exactly as the engine in this mode did.
    fractions = out.cache.routed_fraction()
    assert out.cache.mode == mode and set(fractions) == {1, 3}
    assert all(0.0 < f < 1.0 for f in fractions.values())
    assert fractions == pytest.approx(expected.routed_fraction)


def test_padded_batch_equals_each_row_alone():
    wrapper = from_modlm(mod_model())
    batch, batch_tokens = generate(wrapper, PROMPTS, output_scores=True)
    assert batch.sequences.shape[1] > len(PROMPTS[1]) + NEW   # row 1 really was padded
    for b, prompt in enumerate(PROMPTS):
        alone, tokens = generate(wrapper, [prompt], output_scores=True)
        assert tokens[0] == batch_tokens[b]
        for step_batch, step_alone in zip(batch.scores, alone.scores):
            # float32 rounding differs between batch shapes (matmul blocking), nothing more
            torch.testing.assert_close(step_batch[b], step_alone[0], rtol=1e-4, atol=1e-4)


def test_cached_generation_equals_recomputing_the_full_sequence():
    """The routed KV cache against transformers' no-cache loop, which reruns the full causal
    forward (row by row on the real tokens) at every step."""
    wrapper = from_modlm(mod_model(), "predictor")
    _, cached = generate(wrapper, PROMPTS)
    _, recomputed = generate(wrapper, PROMPTS, use_cache=False)
    assert cached == recomputed


def test_routed_blocks_cache_fewer_tokens_than_dense_blocks():
    model = mod_model()
    out, _ = generate(from_modlm(model), PROMPTS)
    entries = out.cache.block_entries()
    fed = sum(map(len, PROMPTS)) + len(PROMPTS) * (NEW - 1)   # the last token is never fed
    assert entries[0] == entries[2] == fed                      # dense blocks hold every token
    assert 0 < entries[1] < fed and 0 < entries[3] < fed        # routed blocks skipped some
    assert out.cache.routed_blocks() == model.cfg.routed_layers == (1, 3)


def test_sampling_is_reproducible_with_a_seed_and_processors_apply():
    wrapper = from_modlm(mod_model())

    def sample(seed, **kwargs):
        torch.manual_seed(seed)
        return generate(wrapper, PROMPTS, do_sample=True, temperature=1.5, **kwargs)[1]

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    # Logits processors act on the routed model's logits: top_k=1 sampling is greedy.
    assert sample(3, top_k=1) == generate(wrapper, PROMPTS)[1]


def test_a_row_that_stops_leaves_the_others_unchanged():
    wrapper = from_modlm(mod_model())
    _, free = generate(wrapper, PROMPTS)
    eos = free[0][2]
    _, stopped = generate(wrapper, PROMPTS, eos_token_id=eos, pad_token_id=98)
    cut = free[0].index(eos) + 1
    assert len(stopped[0]) > cut and set(stopped[0][cut:]) == {98}   # row 0 stopped, others ran
    for row_free, row_stopped in zip(free, stopped):
        end = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row_stopped[:end] == row_free[:end]
        assert set(row_stopped[end:]) <= {98}


def test_streamer_receives_every_new_token():
    class Collect(BaseStreamer):
        def __init__(self):
            self.puts: list[list[int]] = []

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.puts.append(["end"])

    streamer = Collect()
    _, tokens = generate(from_modlm(mod_model()), [PROMPTS[0]], streamer=streamer)
    assert streamer.puts[0] == PROMPTS[0] and streamer.puts[-1] == ["end"]
    assert [p[0] for p in streamer.puts[1:-1]] == tokens[0]


def test_generation_refusals_say_why():
    wrapper = from_modlm(mod_model())
    with pytest.raises(ValueError, match="beam search"):
        generate(wrapper, PROMPTS, num_beams=2)
    with pytest.raises(GenerationError, match="not causal"):
        generate(wrapper, PROMPTS, routing_mode="topk")
    with pytest.raises(GenerationError, match="max_seq_len=32"):
        generate(wrapper, PROMPTS, max_new_tokens=30)
    no_predictor = from_modlm(mod_model(routing={"predictor": False}), "predictor")
    with pytest.raises(GenerationError, match="predictor"):
        generate(no_predictor, PROMPTS)
    with pytest.raises(ValueError, match="ModLMCache"):
        generate(wrapper, PROMPTS, cache=DynamicCache())


def test_a_returned_cache_continues_the_generation():
    """Passing the returned cache back continues where it stopped: 4 + 4 new tokens equal 8."""
    wrapper = from_modlm(mod_model())
    _, whole = generate(wrapper, PROMPTS)
    first, _ = generate(wrapper, PROMPTS, max_new_tokens=4)
    ids, mask = left_pad(PROMPTS)
    seq = first.sequences
    mask = torch.cat((mask, torch.ones(len(PROMPTS), seq.shape[1] - mask.shape[1],
                                       dtype=mask.dtype)), dim=1)
    assert isinstance(first.cache, ModLMCache)
    more = wrapper.generate(seq, attention_mask=mask, cache=first.cache, max_new_tokens=4,
                            do_sample=False)
    assert more[:, ids.shape[1]:].tolist() == whole


# ---- the full-sequence forward -----------------------------------------------------------------


def test_forward_shifts_labels_and_handles_padding():
    model = mod_model()
    wrapper = from_modlm(model)
    ids, mask = left_pad(PROMPTS)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = wrapper(ids, attention_mask=mask, labels=labels)
        rows = [wrapper(torch.tensor([p]), labels=torch.tensor([p])) for p in PROMPTS]
    for b, (p, row) in enumerate(zip(PROMPTS, rows)):
        torch.testing.assert_close(out.logits[b, -len(p):], row.logits[0], rtol=0, atol=0)
        assert not out.logits[b, :-len(p)].any()                   # padding positions
        # transformers' convention: labels == input_ids, the model shifts.
        torch.testing.assert_close(
            row.lm_loss, F.cross_entropy(row.logits[0, :-1], torch.tensor(p[1:])))
    counts = [len(p) - 1 for p in PROMPTS]
    expected = sum(r.lm_loss * n for r, n in zip(rows, counts)) / sum(counts)
    torch.testing.assert_close(out.lm_loss, expected)
    assert out.loss > out.lm_loss      # the auxiliary losses of Sec 3.5 are added


def test_training_mode_uses_topk_and_trains_the_routers():
    wrapper = from_modlm(mod_model()).train()
    ids = torch.randint(0, 99, (2, 16))
    out = wrapper(ids, labels=ids)
    assert [r.k for r in out.routing] == [2, 2]                   # capacity 0.125 of 16, top-k
    assert all(bool((r.mask_BT.sum(1) == 2).all()) for r in out.routing)
    out.loss.backward()
    assert wrapper.model.blocks[1].router.weight.grad.abs().sum() > 0
    wrapper.eval()
    with torch.no_grad():
        causal = wrapper(ids)
    assert not all(bool((r.mask_BT.sum(1) == 2).all()) for r in causal.routing)


# ---- tokenizers --------------------------------------------------------------------------------

TEXTS = ["Hello wörld, 日本語!\n\n  tabs\tand  spaces", "<|endoftext|> is text here",
         "Ā and \x00 NUL", ""]


def _check_round_trip(tokenizer, directory):
    save_hf_tokenizer(tokenizer, directory, model_max_length=64)
    exported = AutoTokenizer.from_pretrained(directory)
    assert len(exported) == tokenizer.vocab_size and exported.model_max_length == 64
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert exported.encode(text) == ids
        assert exported(text)["input_ids"] == ids
        assert exported.decode(ids) == tokenizer.decode(ids)
    return exported


def test_byte_tokenizer_export_round_trips(tmp_path):
    from modlm.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    exported = _check_round_trip(tok, tmp_path)
    assert exported.encode("Ā") == [0xC4, 0x80]      # not the pad token's symbol
    for broken in ([0xFF, 0x41], [0xE6, 0x97], [0xED, 0xA0, 0x80, 0x41], [0xC3], [0xF0, 0x9F]):
        assert exported.decode(broken) == tok.decode(broken)
    assert exported.pad_token_id == 0
    padded = exported(["ab", "abcd"], padding=True, padding_side="left")
    assert padded["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]


@needs_tokenizers
def test_bpe_tokenizer_export_round_trips(tmp_path):
    from modlm.tokenizer import BPETokenizer
    text = "the quick brown fox jumps over the lazy dog. " * 40 + "ROMEO:\nwherefore art\n" * 20
    tok = BPETokenizer.train(text, 300)
    exported = _check_round_trip(tok, tmp_path)
    assert exported.eos_token_id == exported.pad_token_id == 0
    ids = tok.encode(text[:200])
    assert len(ids) < 200 and exported.encode(text[:200]) == ids   # merges were applied


@needs_tokenizers
@needs_gpt2_files
def test_gpt2_tokenizer_export_round_trips(tmp_path):
    from modlm.tokenizer import GPT2Tokenizer
    exported = _check_round_trip(GPT2Tokenizer.from_package(), tmp_path)
    assert exported.encode("Hello world") == [15496, 995] and exported.eos_token_id == 50256


# ---- exporting a trained run -------------------------------------------------------------------


def _saved_run(tmp_path):
    from modlm.checkpoint import save_checkpoint
    from modlm.tokenizer import ByteTokenizer
    model = MoDLM(tiny_config(vocab_size=256, init_std=0.5, max_seq_len=64)).eval()
    save_checkpoint(tmp_path / "run", step=3, model=model, optimizer_state=None,
                    trainer_state={"step": 3}, model_cfg=model.cfg, tokenizer=ByteTokenizer())
    return model, tmp_path / "run"


def test_export_checkpoint_loads_with_auto_classes_and_generates_like_the_engine(tmp_path):
    from modlm.tokenizer import ByteTokenizer
    model, run = _saved_run(tmp_path)
    out = hf.export_checkpoint(run, tmp_path / "hf")
    hf.register()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["ROMEO:", "JULIET:\nO"]
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    seq = loaded.generate(**enc, max_new_tokens=10, do_sample=False)
    got = tok.batch_decode(seq[:, enc["input_ids"].shape[1]:])
    expected = Engine(model, "router").generate_text(ByteTokenizer(), texts, 10).texts
    assert got == list(expected)


def test_cli_export_hf(tmp_path, capsys):
    from modlm.cli import main
    _, run = _saved_run(tmp_path)
    assert main(["export-hf", str(run), str(tmp_path / "out"), "--mode", "predictor"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "modlm" and config["routing_mode"] == "predictor"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert str(tmp_path / "out") in capsys.readouterr().out
    assert main(["export-hf", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_export_never_overwrites_without_asking_and_never_writes_into_a_run(tmp_path, capsys,
                                                                            monkeypatch):
    from modlm.cli import main
    _, run = _saved_run(tmp_path)
    (run / "config.json").write_text('{"the": "run config"}')
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    ckpt = next((run / "checkpoints").iterdir())
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("my notes")
    before = _snapshot(tmp_path)
    capsys.readouterr()
    for target, extra, says in (
            (run, [], "holds the checkpoint being exported"),      # modlm export-hf RUN RUN
            (run, ["--overwrite"], "holds the checkpoint being exported"),
            (ckpt, ["--overwrite"], "holds the checkpoint being exported"),
            (run / "checkpoints", ["--overwrite"], "holds the checkpoint being exported"),
            (other, [], "not empty; give a new or empty folder, or pass --overwrite"),
            (other / "notes.txt", [], "is a file")):
        assert main(["export-hf", str(run), str(target), *extra]) == 2, target
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert _snapshot(tmp_path) == before, target       # every file byte-identical
    # Another run folder is refused even with --overwrite.
    second = tmp_path / "second"
    _saved_run(second)
    assert main(["export-hf", str(run), str(second / "run"), "--overwrite"]) == 2
    assert "run or checkpoint folder" in capsys.readouterr().err

    # An export that fails part-way leaves the target as it was, and no debris.
    import modlm.hf.tokenizer as tokenizer_module

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(tokenizer_module, "save_hf_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        hf.export_checkpoint(run, other, overwrite=True)
    assert _snapshot(other) == {"notes.txt": b"my notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run", "second"]
    monkeypatch.undo()
    # --overwrite replaces the folder whole once the export is complete.
    assert main(["export-hf", str(run), str(other), "--overwrite"]) == 0
    assert not (other / "notes.txt").exists() and (other / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run", "second"]
    # An empty folder is fine without asking.
    (tmp_path / "empty").mkdir()
    assert main(["export-hf", str(run), str(tmp_path / "empty")]) == 0



def test_export_refuses_any_target_inside_a_run_or_checkpoint_folder(tmp_path, capsys):
    from modlm.cli import main
    _, run = _saved_run(tmp_path)
    (run / "config.json").write_text('{"the": "run config"}')
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "tb").mkdir()                                    # an empty folder of the run
    ckpt = next((run / "checkpoints").iterdir())
    _, second = _saved_run(tmp_path / "second")             # another run, checkpoints only
    second_ckpt = next((second / "checkpoints").iterdir())
    starting = tmp_path / "starting"                        # a run its trainer has just locked
    starting.mkdir()
    (starting / ".lock").write_text("pid 1 on host, since 2025-01-01 00:00:00")
    before = snapshot(tmp_path, folders=True)
    capsys.readouterr()
    inside = "exports never write into a modlm run or checkpoint folder (even with --overwrite)"
    for target, says in (
            (run / "some" / "new" / "sub", inside),            # below the run, not there yet
            (run / "tb", inside),                               # an empty folder of the run
            (ckpt / "sub", inside),                             # inside the exported checkpoint
            (run / "checkpoints" / "step_99999999", inside),   # would look like a checkpoint
            (second / "checkpoints", inside),                   # another run's checkpoints/
            (second_ckpt / "new" / "sub", inside),              # inside another checkpoint
            (starting / "sub", inside),
            (tmp_path / "second", "--overwrite would delete it")):  # holds a run deeper down
        for extra in ([], ["--overwrite"]):
            if says != inside and not extra:
                continue
            assert main(["export-hf", str(run), str(target), *extra]) == 2, target
            err = capsys.readouterr().err
            assert says in err and err.count("\n") == 1 and "Traceback" not in err, err
            # nothing written, nothing removed
            assert snapshot(tmp_path, folders=True) == before, target
    # Folders that merely look alike (a project's own checkpoints/ and meta.json) are no run.
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "model.pt").write_bytes(b"not modlm")
    (project / "meta.json").write_text("{}")
    assert main(["export-hf", str(run), str(project / "exports" / "new")]) == 0
    assert (project / "exports" / "new" / "model.safetensors").is_file()

# ---- dense parity with Llama -------------------------------------------------------------------


def _dense_model(tied: bool) -> MoDLM:
    torch.manual_seed(0)
    model = MoDLM(dense(tiny_config(init_std=0.2, tie_embeddings=tied, n_layers=3))).eval()
    with torch.no_grad():   # norms away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [True, False])
def test_dense_model_equals_hf_llama_with_the_same_weights(attn, tied):
    model = _dense_model(tied)
    llama = to_llama(model, attn_implementation=attn)
    assert llama.config._attn_implementation == attn
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 99, (2, 19))
    with torch.no_grad():
        ours = model(ids).logits_BTV
        theirs = llama(ids).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    back = from_llama(llama)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_llama_parity_needs_the_rotary_permutation():
    model = _dense_model(True)
    llama = to_llama(model, attn_implementation="eager")
    undo = torch.argsort(rope_permutation(model.cfg.head_dim))
    H, Dh = model.cfg.n_heads, model.cfg.head_dim
    with torch.no_grad():   # the naive mapping: modlm's q/k rows copied without the permutation
        for layer in llama.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(proj.weight.view(H, Dh, -1)[:, undo].reshape(H * Dh, -1))
    ids = torch.randint(0, 99, (2, 19))
    with torch.no_grad():
        gap = (llama(ids).logits - model(ids).logits_BTV).abs().max()
    assert gap > 1e-2


def test_llama_mapping_refuses_a_routed_model():
    with pytest.raises(ValueError, match="only a dense modlm model maps onto Llama"):
        to_llama(mod_model())
