"""Decode speed with the KV cache: dense vs same-shape MoD, batch 1 and batch 8, side by side.

The MoD model is first trained briefly with the auxiliary loss on the built-in corpus, so its
routers' causal decisions settle near the capacity (an untrained router routes arbitrarily);
the dense twin's speed does not depend on its weights. Both then generate greedily from prompts
of held-out text, interleaved, and the median decode tokens/s, the routed fraction per routed
block and the KV-cache size are printed.

Sampling is at temperature 1 (seeded) by default, so the generated text follows the model's
distribution: greedy decoding from a briefly trained model falls into repetitive text on which
some routers route almost nothing, which would flatter MoD's speed (`--temperature 0` shows it).

    python benchmarks/decode.py --json benchmarks/results/decode.json
    python benchmarks/decode.py --run runs/my-mod-run      # reuse a trained MoD run instead
    python benchmarks/decode.py --hf ...                   # also Hugging Face `generate` on a
                                                           # same-shape Llama, interleaved
                                                           # (pip install 'modlm[hf]')
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time

import torch

from modlm.checkpoint import load_model, resolve_checkpoint
from modlm.config import ModelConfig
from modlm.corpus import load_builtin_corpus
from modlm.data import DataConfig
from modlm.generate import Engine
from modlm.measure import hf_decode_tokens_per_s
from modlm.model import MoDLM
from modlm.presets import dense
from modlm.train import TrainConfig, train


def trained_mod(args: argparse.Namespace) -> MoDLM:
    if args.run:
        model, _ = load_model(resolve_checkpoint(args.run))
        return model
    cfg = ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, max_seq_len=1024)
    with tempfile.TemporaryDirectory() as out:
        tc = TrainConfig(model=cfg, data=DataConfig(seq_len=args.train_seq_len),
                         steps=args.train_steps, batch_size=args.train_batch, lr=2e-3,
                         warmup_steps=10, eval_every=args.train_steps, eval_batches=2,
                         checkpoint_every=args.train_steps, device="cpu", out_dir=out,
                         run_name="mod", log_every=args.train_steps)
        t0 = time.perf_counter()
        result = train(tc)
        print(f"trained the MoD model for {args.train_steps} steps in "
              f"{time.perf_counter() - t0:.0f} s")
        model, _ = load_model(result.last_checkpoint)
    return model


class HFLlama:
    """Hugging Face `generate` on a random LlamaForCausalLM of the dense twin's shape (SwiGLU,
    rotary, RMSNorm, no biases, tied embeddings, sdpa attention). Decode tokens/s exclude the
    prefill: (time(n new) - time(1 new)) / (n - 1) steps."""

    def __init__(self, cfg: ModelConfig, sample: bool) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM
        self.sample = sample
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
            tie_word_embeddings=True, attn_implementation="sdpa")).eval()

    def decode_tokens_per_s(self, prompts: list[list[int]], new_tokens: int) -> float:
        return hf_decode_tokens_per_s(self.model, prompts, new_tokens, self.sample)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--mode", default="router", choices=("router", "predictor"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--run", default=None, help="a trained MoD run (skips the training)")
    p.add_argument("--hf", action="store_true",
                   help="also time Hugging Face generate on a same-shape Llama")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    mod = trained_mod(args).eval()
    torch.manual_seed(0)
    twin = MoDLM(dense(mod.cfg)).eval()
    engines = {"dense": Engine(twin, mode=args.mode), "mod": Engine(mod, mode=args.mode)}
    hf = HFLlama(twin.cfg, sample=args.temperature > 0) if args.hf else None
    val = load_builtin_corpus().val.encode("utf-8")
    results = {}
    for B in args.batches:
        stride = len(val) // (B + 1)
        prompts = [list(val[i * stride: i * stride + args.prompt_len]) for i in range(B)]
        names = list(engines) + (["hf"] if hf else [])
        speeds: dict[str, list[float]] = {name: [] for name in names}
        last = {}
        for r in range(args.repeats + 1):  # the first round warms up
            for name in (names if r % 2 == 0 else names[::-1]):
                if name == "hf":
                    speed = hf.decode_tokens_per_s(prompts, args.new_tokens)
                else:
                    last[name] = engines[name].generate(
                        prompts, args.new_tokens, temperature=args.temperature, seed=args.seed)
                    speed = last[name].decode_tokens_per_s
                if r > 0:
                    speeds[name].append(speed)
        med = {name: statistics.median(v) for name, v in speeds.items()}
        results[B] = {
            "decode_tokens_per_s": med, "all": speeds, "ratio": med["mod"] / med["dense"],
            "routed_fraction": last["mod"].routed_fraction,
            "decode_routed_fraction": last["mod"].decode_routed_fraction,
            "kv_cache_bytes": {n: last[n].kv_cache_bytes for n in last},
            "kv_cache_ratio": last["mod"].kv_cache_ratio,
        }
        rf = "  ".join(f"{k}: {v:.3f}" for k, v in last["mod"].decode_routed_fraction.items())
        results[B]["decode_routed_mean"] = statistics.mean(
            last["mod"].decode_routed_fraction.values())
        hf_part = f", Hugging Face {med['hf']:.1f}" if hf else ""
        print(f"batch {B}: decode tokens/s dense {med['dense']:.1f}, MoD {med['mod']:.1f}"
              f"{hf_part}, "
              f"ratio {med['mod'] / med['dense']:.2f}; routed per block while decoding {rf}; "
              f"(mean {results[B]['decode_routed_mean']:.3f}); "
              f"KV cache {last['mod'].kv_cache_ratio:.2f} of dense")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "args": vars(args), "torch": torch.__version__,
                       "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                       "mod_config": dataclasses.asdict(mod.cfg)}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
