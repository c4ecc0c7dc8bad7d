"""Folders from someone else: a hostile checkpoint, export or tokenizer is refused with a clear
error, before it reads outside its folder or allocates what its weights do not justify."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    modlm,
    needs_tokenizers,
    needs_transformers,
    one_line_error,
    snapshot,
    write,
)

from modlm.checkpoint import CheckpointError, load_model, model_config_hash, save_checkpoint
from modlm.config import ModelConfig
from modlm.model import MoDLM
from modlm.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer
from modlm.untrusted import UntrustedFileError, inside, json_depth, read_json

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_mlp=37, max_seq_len=16)
NESTED = "[" * 100_000 + "]" * 100_000


def _checkpoint(tmp_path: Path, run_config: dict | None = None) -> Path:
    return save_checkpoint(tmp_path / "run", step=1, model=MoDLM(CFG), optimizer_state=None,
                           trainer_state={"step": 1}, model_cfg=CFG, tokenizer=ByteTokenizer(),
                           run_config=run_config)


def _forge(ckpt: Path, rel: str, content: str | bytes) -> None:
    """Rewrite `rel` and record it in meta.json as a forger would: consistent sizes, hashes and
    model-config hash, so only the content itself can give it away."""
    write(ckpt / rel, content)
    meta = json.loads((ckpt / "meta.json").read_text())
    data = (ckpt / rel).read_bytes()
    meta["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if rel == "config.json":
        try:
            model = json.loads(data)["model"]
            meta["model_config_hash"] = model_config_hash(ModelConfig.from_dict(model))
        except (ValueError, KeyError, RecursionError):
            pass
    (ckpt / "meta.json").write_text(json.dumps(meta))


# ---- the primitives ----------------------------------------------------------------------------

def test_read_json_refuses_deep_nesting_and_oversized_files_with_a_clear_error(tmp_path):
    deep = write(tmp_path / "deep.json", NESTED)
    with pytest.raises(UntrustedFileError, match="nests deeper"):
        read_json(deep)
    moderately = write(tmp_path / "moderate.json", "[" * 200 + "]" * 200)
    with pytest.raises(UntrustedFileError, match="nests 200 levels"):
        read_json(moderately)
    big = write(tmp_path / "big.json", "[" + "0," * 1000 + "0]")
    with pytest.raises(UntrustedFileError, match="more than"):
        read_json(big, max_bytes=100)
    assert read_json(write(tmp_path / "ok.json", '{"a": [1, {"b": 2}]}')) == {"a": [1, {"b": 2}]}
    assert json_depth({"a": [1, {"b": 2}]}) == 3 and json_depth(5) == 0


def test_inside_refuses_absolute_parent_and_linked_names(tmp_path):
    folder = tmp_path / "f"
    write(folder / "ok.txt", "x")
    write(tmp_path / "secret.txt", "s")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert inside(folder, "ok.txt", "meta") == folder / "ok.txt"
    (folder / "loop").symlink_to(folder / "loop")
    for bad in ("/etc/passwd", "../secret.txt", "a/../../secret.txt", "link.txt", "", 3,
                "loop"):
        with pytest.raises(UntrustedFileError):
            inside(folder, bad, "meta")


# ---- modlm checkpoints -------------------------------------------------------------------------

def test_a_checkpoint_listing_files_outside_itself_is_refused(tmp_path):
    """meta.json lists the tokenizer's files, and a loader verifies each by reading it: a listed
    `tokenizer/../../secret.txt` (with its true size and hash) must not be read."""
    ckpt = _checkpoint(tmp_path)
    secret = (tmp_path / "secret.txt")
    secret.write_bytes(b"not yours")
    meta = json.loads((ckpt / "meta.json").read_text())
    rel = "tokenizer/" + os.path.relpath(secret, ckpt / "tokenizer")
    assert (ckpt / rel).resolve() == secret.resolve()
    meta["files"][rel] = {"size": 9, "sha256": hashlib.sha256(b"not yours").hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="outside"):
        load_model(ckpt)


def test_a_checkpoint_holding_a_link_out_of_itself_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    write(tmp_path / "secret.json", '{"name": "bytes"}')
    (ckpt / "tokenizer" / "extra.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(CheckpointError, match="outside"):
        load_model(ckpt)


@pytest.mark.parametrize("field,value", [("d_model", 65536), ("vocab_size", 50_000_000),
                                         ("n_layers", 4000), ("max_seq_len", 200_000_000)])
def test_config_shapes_that_the_weights_do_not_justify_are_refused_before_allocating(
        tmp_path, field, value):
    """A forged config.json (hashes consistent) asks for a model hundreds of GB large, or for
    thousands of layers, beside a weights file of a few KB: refused from the header's shapes,
    before any model is built (in a subprocess, so its peak memory is its own)."""
    ckpt = _checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"][field] = value
    if field == "d_model":
        config["model"]["d_mlp"] = None
    _forge(ckpt, "config.json", json.dumps(config))
    before = snapshot(ckpt)
    script = ("import resource, sys\nfrom modlm.checkpoint import load_model\n"
              "try:\n    load_model(sys.argv[1])\nexcept Exception as e:\n"
              "    print(type(e).__name__, '|', e)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(ckpt)], capture_output=True,
                          text=True, timeout=120)
    first, peak_kib = proc.stdout.strip().splitlines()
    assert first.startswith("UntrustedFileError |"), proc.stdout + proc.stderr
    assert "nothing was allocated" in first or "layers" in first or "derived" in first, first
    assert int(peak_kib) < 1_500_000, f"peak {int(peak_kib) / 1024:.0f} MiB"
    assert snapshot(ckpt) == before


def test_a_deeply_nested_checkpoint_config_gives_one_line_not_a_recursion_error(tmp_path):
    ckpt = _checkpoint(tmp_path)
    _forge(ckpt, "config.json", '{"model": ' + NESTED + "}")
    one_line_error(modlm("sample", str(ckpt), "--prompt", "a", "--max-new-tokens", "1"),
                   "nests deeper", alone=True)
    nested_meta = tmp_path / "other" / "checkpoints" / "step_00000001"
    write(nested_meta / "meta.json", NESTED)
    one_line_error(modlm("sample", str(nested_meta), "--prompt", "a", "--max-new-tokens", "1"),
                   "meta.json", alone=True)


def test_eval_never_reads_the_corpus_or_writes_the_cache_a_checkpoint_names(tmp_path):
    planted_cache = tmp_path / "planted-cache"
    secret = write(tmp_path / "secret.txt", "private text " * 400)
    ckpt = _checkpoint(tmp_path, run_config={"data": {"corpus": secret,
                                                      "cache_dir": str(planted_cache),
                                                      "seq_len": 8}})
    user_cache = tmp_path / "user-cache"
    env = {"MODLM_CACHE_DIR": str(user_cache)}
    err = one_line_error(modlm("eval", str(ckpt), "--batches", "1", env=env), "--corpus", secret,
                         alone=True)
    assert "reads no path a checkpoint names" in err
    # The user names the corpus: it is read, and tokens go to the user's cache, not the planted one.
    ok = modlm("eval", str(ckpt), "--corpus", secret, "--batches", "1", "--mode", "topk",
               env=env)
    assert ok.returncode == 0, ok.stderr
    assert "val" in ok.stdout and not planted_cache.exists()
    assert any(user_cache.iterdir())


# ---- tokenizers --------------------------------------------------------------------------------

def test_tokenizer_metadata_that_is_hostile_gives_a_tokenizer_error(tmp_path):
    write(tmp_path / "deep" / "modlm_tokenizer.json", NESTED)
    with pytest.raises(TokenizerError, match="nests deeper"):
        load_tokenizer(tmp_path / "deep")


@needs_tokenizers
def test_a_garbage_tokenizer_json_gives_a_tokenizer_error(tmp_path):
    write(tmp_path / "bad" / "tokenizer.json", '{"version": "1.0", "model": ' + NESTED + "}")
    with pytest.raises(TokenizerError, match="tokenizer"):
        load_tokenizer(tmp_path / "bad")
    write(tmp_path / "bad2" / "tokenizer.json", '{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(TokenizerError, match="cannot be read"):
        load_tokenizer(tmp_path / "bad2")


@needs_transformers
@needs_tokenizers
def test_an_hf_tokenizer_config_naming_files_outside_its_folder_is_refused(tmp_path):
    """transformers opens a tokenizer_config.json's vocab_file wherever it points: modlm checks
    first, so a folder from someone else cannot make it read /etc or a sibling's files."""
    from modlm.tokenizer import PretrainedTokenizer
    outside = tmp_path / "outside"
    write(outside / "vocab.json", json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}))
    write(outside / "merges.txt", "#version: 0.2\n")
    for value in (str(outside / "vocab.json"), "../outside/vocab.json"):
        folder = tmp_path / "victim"
        write(folder / "tokenizer_config.json", json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "vocab_file": value,
            "merges_file": str(outside / "merges.txt")}))
        with pytest.raises(TokenizerError, match="outside"):
            PretrainedTokenizer.from_folder(folder)
    write(tmp_path / "nested" / "tokenizer_config.json", NESTED)
    with pytest.raises(TokenizerError, match="nests deeper"):
        PretrainedTokenizer.from_folder(tmp_path / "nested")


# ---- Hugging Face exports ----------------------------------------------------------------------

@needs_transformers
@pytest.mark.parametrize("field,value", [("d_model", 32768), ("vocab_size", 100_000_000),
                                         ("n_layers", 4000), ("max_seq_len", 1_000_000_000)])
def test_an_export_whose_config_does_not_fit_its_weights_is_refused_before_allocating(
        tmp_path, field, value):
    from modlm.hf.modeling import ModLMForCausalLM, from_modlm
    folder = tmp_path / "export"
    from_modlm(MoDLM(CFG)).save_pretrained(folder)
    assert isinstance(ModLMForCausalLM.from_pretrained(folder), ModLMForCausalLM)
    config = json.loads((folder / "config.json").read_text())
    config["modlm"][field] = value
    mirrored = {"d_model": "hidden_size", "vocab_size": "vocab_size",
                "n_layers": "num_hidden_layers", "max_seq_len": "max_position_embeddings"}
    config[mirrored[field]] = value
    if field == "d_model":
        config["modlm"]["d_mlp"] = None
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedFileError, match="model folder"):
        ModLMForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text(NESTED)
    with pytest.raises(UntrustedFileError, match="nests deeper"):
        ModLMForCausalLM.from_pretrained(folder)


@needs_transformers
@pytest.mark.parametrize("field,value", [("num_hidden_layers", 12), ("vocab_size", 5_000_000),
                                         ("num_hidden_layers", 3000)])
def test_a_pretrained_source_whose_config_asks_for_more_than_its_weights_is_refused(
        tmp_path, field, value):
    """A Hugging Face folder to retrofit (retrofit.source) may come from anyone: transformers
    would allocate and randomly initialise every weight its config names that the file lacks."""
    from support import tiny_hf_model

    from modlm.hf.retrofit import load_hf_model
    folder = tmp_path / "source"
    tiny_hf_model("llama").save_pretrained(folder)
    assert load_hf_model(folder) is not None
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedFileError, match="does not describe these weights"):
        load_hf_model(folder)
    (folder / "config.json").write_text(NESTED)
    with pytest.raises(UntrustedFileError, match="nests deeper"):
        load_hf_model(folder)
