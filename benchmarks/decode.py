"""Decode speed at the FLOP limit: dense vs same-shape MoD with the token-skipping KV cache,
beside the FLOP-predicted ratio, and Hugging Face `generate` on the dense shape.

Shapes: d_model 256 and 512 (`--widths`), 8 layers, head width 64, SwiGLU, byte vocabulary;
the MoD model routes blocks 1, 3, 5, 7 at 12.5%. Routing is *rate-controlled*: every router is a
`modlm.measure.RateRouter`, which does a learned router's work per token and routes each token
with probability 0.125 whatever its content, in the causal "router" mode. So no training is
needed to time sampling at the paper's capacity (weights do not change the speed), and the
routed fraction is the capacity up to sampling noise (the fraction reached is measured and the
prediction uses it). The dense twin has the same shape; "hf" is `LlamaForCausalLM.generate` on a
random Llama of the dense shape (sdpa attention, tied embeddings; `--hf`).

Each setting (width x batch x prompt length) decodes `--new-tokens` tokens per row after random
prompts, sampling at temperature 1 (seeded), dense / MoD / HF interleaved in one process (the
order alternates), a warm-up round and the median of `--repeats`. Decode tokens/s count the new
tokens of all rows per second of decode steps (prefill excluded; HF: (time(n) - time(1)) /
(n - 1) steps). The FLOP-predicted speed-up is `modlm.flops.decode_flops` (one decoded token,
routed blocks at the measured routed fraction with a cache of that share of the context) at the
mean context, dense / MoD. `--profile` adds, for each MoD setting, where a decode step's time
goes (torch.profiler over 32 steps: matrix products and attention kernels, the other torch ops,
and the rest, Python and dispatch).

    python benchmarks/decode.py --hf --profile --json benchmarks/results/decode.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from typing import Any

import torch

from modlm import flops
from modlm.config import ModelConfig
from modlm.generate import Engine
from modlm.measure import (
    RateRouter,
    hf_decode_tokens_per_s,
    interleaved,
    medians,
    route_at_rate,
)
from modlm.model import MoDLM
from modlm.presets import dense
from modlm.runtime import cpu_model

PROFILE_STEPS = 32
KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
           "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math")


class HFLlama:
    """Hugging Face `generate` on a random LlamaForCausalLM of the dense twin's shape (SwiGLU,
    rotary, RMSNorm, no biases, tied embeddings, sdpa attention)."""

    def __init__(self, cfg: ModelConfig) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
            tie_word_embeddings=True, attn_implementation="sdpa", bos_token_id=None,
            eos_token_id=None)).eval()

    def decode_tokens_per_s(self, prompts: list[list[int]], new_tokens: int) -> float:
        return hf_decode_tokens_per_s(self.model, prompts, new_tokens, sample=True)


def step_profile(engine: Engine, prompts: list[list[int]],
                 steps: int = PROFILE_STEPS) -> dict[str, float]:
    """Milliseconds per decode step by kind (under the profiler, which adds its own overhead):
    matrix products and attention kernels, the other torch ops, and the rest (Python, dispatch,
    the engine's bookkeeping)."""
    state, logits = engine.prefill(prompts, max_tokens=len(prompts[0]) + steps + 8)
    tok = logits.argmax(-1)
    for _ in range(4):
        tok = engine.decode_step(state, tok).argmax(-1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = engine.decode_step(state, tok).argmax(-1)
        wall = time.perf_counter() - t0
    kernels = other = 0.0
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("mkldnn::"):
            if e.key in KERNELS:
                kernels += e.self_cpu_time_total
            else:
                other += e.self_cpu_time_total
    ms = lambda us: us / 1e3 / steps  # noqa: E731
    return {"step_ms": wall * 1e3 / steps, "kernels_ms": ms(kernels), "other_ops_ms": ms(other),
            "python_ms": wall * 1e3 / steps - ms(kernels) - ms(other)}


def time_setting(engines: dict[str, Engine], hf: HFLlama | None, prompts: list[list[int]],
                 new_tokens: int, repeats: int, routers: list[RateRouter]
                 ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Decode tokens/s of each generator, interleaved; and each engine's last result. In a
    round every engine samples with the same seed and the MoD engines route with the same draws,
    so eager and compiled engines generate the same text."""
    last: dict[str, Any] = {}
    rounds: dict[str, int] = {name: 0 for name in engines}

    def gen(name: str) -> float:
        for router in routers:
            router.rewind()
        last[name] = engines[name].generate(prompts, new_tokens, temperature=1.0,
                                            seed=rounds[name])
        rounds[name] += 1
        return last[name].decode_tokens_per_s

    fns = {n: (lambda n=n: gen(n)) for n in engines}
    if hf is not None:
        fns["hf"] = lambda: hf.decode_tokens_per_s(prompts, new_tokens)
    return interleaved(fns, repeats=repeats, warmup=1), last


def _share_equal(a: tuple[tuple[int, ...], ...], b: tuple[tuple[int, ...], ...]) -> float:
    """The share of positions at which two generations hold the same token."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[512],
                   help="prompt lengths at every batch size")
    p.add_argument("--long-prompt-lens", type=int, nargs="*", default=[2048, 4096],
                   help="longer prompts, at batch 1 only")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf", action="store_true", help="also Hugging Face generate (dense shape)")
    p.add_argument("--profile", action="store_true", help="where a MoD decode step's time goes")
    p.add_argument("--compile", action="store_true",
                   help="also time Engine(compile=True), dense and MoD (one graph per step)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    settings = ([(B, P) for P in args.prompt_lens for B in args.batches]
                + [(1, P) for P in args.long_prompt_lens])
    longest = max(P for _, P in settings) + max(args.new_tokens, PROFILE_STEPS + 8)
    g = torch.Generator().manual_seed(1)
    results: list[dict[str, Any]] = []
    for d in args.widths:
        cfg = ModelConfig(vocab_size=256, d_model=d, n_layers=args.layers, n_heads=d // 64,
                          max_seq_len=longest)
        cfg = dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing,
                                                                   capacity=args.capacity))
        torch.manual_seed(0)
        mod = MoDLM(cfg).eval()
        routers = route_at_rate(mod, args.capacity)
        twin = MoDLM(dense(cfg)).eval()
        engines = {"dense": Engine(twin, "router"), "mod": Engine(mod, "router")}
        if args.compile:
            engines |= {"dense_compiled": Engine(twin, "router", compile=True),
                        "mod_compiled": Engine(mod, "router", compile=True)}
        hf = HFLlama(twin.cfg) if args.hf else None
        for B, P in settings:
            prompts = torch.randint(0, 256, (B, P), generator=g).tolist()
            samples, last = time_setting(engines, hf, prompts, args.new_tokens, args.repeats,
                                         routers)
            med = medians(samples)
            r = last["mod"]
            f_dec = {int(k): v for k, v in r.decode_routed_fraction.items()}
            context = P + (args.new_tokens - 1) / 2
            base = flops.decode_flops(twin.cfg, context).total
            predicted = base / flops.decode_flops(cfg, context, f_dec).total
            nominal = base / flops.decode_flops(cfg, context).total
            row = {"d_model": d, "batch": B, "prompt_len": P, "tokens_per_s": med,
                   "samples": samples, "speedup": med["mod"] / med["dense"],
                   "flop_predicted": predicted, "flop_predicted_at_capacity": nominal,
                   "of_predicted": med["mod"] / med["dense"] / predicted,
                   "decode_routed_fraction": f_dec,
                   "decode_routed_mean": statistics.fmean(f_dec.values()),
                   "kv_cache_bytes": {n: last[n].kv_cache_bytes for n in last},
                   "kv_cache_ratio": r.kv_cache_ratio}
            if args.compile:
                row["speedup_compiled"] = med["mod_compiled"] / med["dense_compiled"]
                row["of_predicted_compiled"] = row["speedup_compiled"] / predicted
                row["same_tokens_compiled"] = {
                    n: _share_equal(last[f"{n}_compiled"].tokens, last[n].tokens)
                    for n in ("dense", "mod")}
            if hf is not None:
                row["dense_over_hf"] = med["dense"] / med["hf"]
            if args.profile:
                row["profile"] = {n: step_profile(e, prompts) for n, e in engines.items()}
            results.append(row)
            hf_part = (f", HF {med['hf']:.1f} (dense / HF {row['dense_over_hf']:.2f})"
                       if hf is not None else "")
            compiled_part = (f"; compiled: dense {med['dense_compiled']:.1f}, MoD "
                             f"{med['mod_compiled']:.1f}, MoD / dense "
                             f"{row['speedup_compiled']:.2f} (of predicted "
                             f"{row['of_predicted_compiled']:.2f}; tokens equal to eager's: "
                             + ", ".join(f"{n} {v:.3f}" for n, v in
                                         row["same_tokens_compiled"].items())
                             + ")" if args.compile else "")
            print(f"d{d} batch {B} prompt {P}: decode tokens/s dense {med['dense']:.1f}, MoD "
                  f"{med['mod']:.1f}{hf_part}; MoD / dense {row['speedup']:.2f}, FLOP-predicted "
                  f"{predicted:.2f} (measured / predicted {row['of_predicted']:.2f}); routed "
                  f"{row['decode_routed_mean']:.3f}; KV cache MoD / dense "
                  f"{r.kv_cache_ratio:.2f}{compiled_part}", flush=True)
            if args.profile:
                print("   per step, ms: " + "; ".join(
                    f"{n} {v['step_ms']:.2f} (kernels {v['kernels_ms']:.2f}, other ops "
                    f"{v['other_ops_ms']:.2f}, rest {v['python_ms']:.2f})"
                    for n, v in row["profile"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "args": vars(args), "torch": torch.__version__,
                       "python": platform.python_version(), "machine": cpu_model(),
                       "date": time.strftime("%Y-%m-%d")}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
