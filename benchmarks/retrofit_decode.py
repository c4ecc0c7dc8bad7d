"""Decode speed of a retrofitted Llama of SmolLM2-135M's shape against Hugging Face's own
`generate` on the original model, side by side in one process.

The model: 30 layers, d 576, 9 query / 3 key-value heads (head width 64), SwiGLU MLP 1536,
vocabulary 49152, tied embeddings, rope theta 1e5: SmolLM2-135M's architecture with random weights
(speed does not depend on the weights). Three generators decode the same prompts (random token
ids, `--prompt-len` each) for `--new-tokens`, sampling at temperature 1 (greedy text from random
weights repeats one token, on which a router routes all or nothing), interleaved in rounds (the
first round warms up, the order alternates, medians of `--repeats`):

- "hf": `LlamaForCausalLM.generate` on the original model with its own KV cache (DynamicCache),
  decode tokens/s = (time(n new) - time(1 new)) / (n - 1) steps, so its prefill is excluded
  (top_k 0, top_p 1: plain sampling, as the engine's);
- "engine": modlm's engine on the same model retrofitted with no routed layer (every layer runs
  every token through the `DecoderLayer` interface: what the engine costs unrouted);
- "mod": modlm's engine on a copy retrofitted with routers on every other layer (1, 3, ..., 29)
  at capacity 12.5%, in the causal "router" mode, with the routing calibrated to the capacity:
  each router's decision threshold is set to the (1 - capacity) quantile of its logits on the
  prompts, then twice more on the tokens of a calibration generation's decode steps (a random
  router vector scores tokens arbitrarily, but at the right rate); the routed fraction reached
  while decoding is measured and reported.

The FLOP-predicted speed-up counts one decoded token's multiply-adds exactly for this shape
(q/k/v/o projections with grouped-query attention, MLP, attention over the cache, LM head, the
router), routed layers at the measured decode routed fraction with a cache of that fraction of
the context:

    python benchmarks/retrofit_decode.py --json benchmarks/results/retrofit_decode.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from modlm.config import RoutingConfig
from modlm.generate import Engine
from modlm.hf.retrofit import retrofit
from modlm.measure import hf_decode_tokens_per_s  # HF generate, prefill excluded
from modlm.router import LinearRouter

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, head_dim=64,
             max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
             rms_norm_eps=1e-5)


class CalibratedRouter(LinearRouter):
    """A linear router whose causal decision threshold routes `capacity` of the calibration
    tokens. While `calibrating` on a prefill, each call sets the threshold to the (1 - capacity)
    quantile of its own logits before the decision is read, so one prefill calibrates every layer
    in order; while `recording`, decode steps' logits are kept and `settle()` sets the threshold
    from them."""

    def __init__(self, weight: torch.nn.Parameter, capacity: float) -> None:
        super().__init__(weight.shape[0])
        self.weight = weight
        self.capacity = capacity
        self.threshold = 0.0
        self.calibrating = False
        self.recorded: list[torch.Tensor] | None = None

    def causal_threshold(self, capacity: float) -> float:
        return self.threshold

    def settle(self) -> None:
        logits = torch.cat([r.flatten() for r in self.recorded]).float()
        self.threshold = float(torch.quantile(logits, 1 - self.capacity))
        self.recorded = None

    def forward(self, x_BTD: torch.Tensor, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        logits = super().forward(x_BTD, generator)
        if self.calibrating:
            self.threshold = float(torch.quantile(logits.flatten().float(), 1 - self.capacity))
        if self.recorded is not None and logits.shape[1] == 1:
            self.recorded.append(logits.detach())
        return logits


def calibrate(engine: Engine, routers: list[CalibratedRouter], prompts: list[list[int]],
              new_tokens: int) -> None:
    for r in routers:
        r.calibrating = True
    engine.prefill(prompts)
    for r in routers:
        r.calibrating = False
    for round_ in range(2):
        for r in routers:
            r.recorded = []
        engine.generate(prompts, new_tokens, temperature=1.0, seed=1000 + round_)
        for r in routers:
            r.settle()


def decode_macs(shape: dict, context: float, routed: dict[int, float]) -> float:
    """Multiply-adds of one decoded token: every layer (routed ones at their routed fraction f,
    attending over f of the context), the routers and the LM head."""
    d, H, G, Dh = (shape["hidden_size"], shape["num_attention_heads"],
                   shape["num_key_value_heads"], shape["head_dim"])
    proj = d * H * Dh * 2 + 2 * d * G * Dh + 3 * d * shape["intermediate_size"]
    total = d * shape["vocab_size"]
    for layer in range(shape["num_hidden_layers"]):
        f = routed.get(layer, 1.0)
        total += f * (proj + 2 * H * Dh * f * context) + (d if layer in routed else 0)
    return total


def decode_bytes(shape: dict, batch: int, context: float, routed: dict[int, float],
                 runs: dict[int, float]) -> float:
    """Bytes one decode step reads (float32): each layer's weights once if it runs at all in the
    step (a routed layer in the share `runs` of steps, whatever number of rows routes), the KV
    cache each row attends over (routed layers: the rows that route, over their routed share of
    the context), and the LM head. On a CPU whose decode is memory-bound this, not the FLOPs,
    bounds the speed-up at batch > 1."""
    d, H, G, Dh, F = (shape["hidden_size"], shape["num_attention_heads"],
                      shape["num_key_value_heads"], shape["head_dim"],
                      shape["intermediate_size"])
    weights = 4 * (2 * d * H * Dh + 2 * d * G * Dh + 3 * d * F + 2 * d)
    kv_per_token = 4 * 2 * G * Dh
    total = 4 * d * shape["vocab_size"]
    for layer in range(shape["num_hidden_layers"]):
        f = routed.get(layer, 1.0)
        total += runs.get(layer, 1.0) * weights + batch * f * (f * context) * kv_per_token
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPE, **({"num_hidden_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    original = LlamaForCausalLM(LlamaConfig(**shape, eos_token_id=None, bos_token_id=None,
                                            attn_implementation="sdpa")).eval()
    unrouted = retrofit(original, RoutingConfig(router="none"))   # wraps, patches nothing
    mod = retrofit(copy.deepcopy(original), RoutingConfig(capacity=args.capacity)).eval()
    for layer in mod.routed_layers():
        layer.router = CalibratedRouter(layer.router.weight, args.capacity)
    routed_layers = [layer.index for layer in mod.routed_layers()]
    # Count the decode steps in which each routed layer runs at all (its MLP is called once per
    # run, on the rows that route).
    runs = {i: 0 for i in routed_layers}
    for layer in mod.routed_layers():
        layer.layer.mlp.register_forward_pre_hook(
            lambda m, a, i=layer.index: runs.__setitem__(i, runs[i] + (a[0].shape[1] == 1)))
    engines = {"engine": Engine(unrouted, "router"), "mod": Engine(mod, "router")}

    results = {}
    g = torch.Generator().manual_seed(1)
    for B in args.batches:
        prompts = torch.randint(0, shape["vocab_size"], (B, args.prompt_len), generator=g).tolist()
        calibrate(engines["mod"], [layer.router for layer in mod.routed_layers()], prompts,
                  args.new_tokens)
        names = ["hf", "engine", "mod"]
        speeds: dict[str, list[float]] = {n: [] for n in names}
        last = {}
        for r in range(args.repeats + 1):           # the first round warms up
            for name in (names if r % 2 == 0 else names[::-1]):
                if name == "hf":
                    speed = hf_decode_tokens_per_s(original, prompts, args.new_tokens, True)
                else:
                    for i in runs:
                        runs[i] = 0
                    last[name] = engines[name].generate(prompts, args.new_tokens,
                                                        temperature=1.0, seed=r)
                    if name == "mod":
                        run_share = {i: n / (args.new_tokens - 1) for i, n in runs.items()}
                    speed = last[name].decode_tokens_per_s
                if r > 0:
                    speeds[name].append(speed)
        med = {n: statistics.median(v) for n, v in speeds.items()}
        f_dec = last["mod"].decode_routed_fraction
        context = args.prompt_len + args.new_tokens / 2
        predicted = (decode_macs(shape, context, {})
                     / decode_macs(shape, context, {i: f_dec[i] for i in routed_layers}))
        nominal = (decode_macs(shape, context, {})
                   / decode_macs(shape, context, {i: args.capacity for i in routed_layers}))
        measured = med["mod"] / med["hf"]
        traffic = (decode_bytes(shape, B, context, {}, {})
                   / decode_bytes(shape, B, context, {i: f_dec[i] for i in routed_layers},
                                  run_share))
        results[B] = {
            "decode_tokens_per_s": med, "all": speeds,
            "speedup_vs_hf": measured, "speedup_vs_engine_unrouted": med["mod"] / med["engine"],
            "unrouted_engine_vs_hf": med["engine"] / med["hf"],
            "flop_predicted_speedup": predicted, "flop_predicted_at_capacity": nominal,
            "measured_over_predicted": measured / predicted,
            "traffic_predicted_speedup": traffic, "measured_over_traffic": measured / traffic,
            "routed_layer_run_share_mean": statistics.mean(run_share.values()),
            "decode_routed_fraction_mean": statistics.mean(f_dec.values()),
            "decode_routed_fraction": f_dec,
            "kv_cache_ratio": last["mod"].kv_cache_ratio,
        }
        print(f"batch {B}: decode tokens/s HF generate {med['hf']:.1f}, engine unrouted "
              f"{med['engine']:.1f} ({med['engine'] / med['hf']:.2f}x HF), MoD {med['mod']:.1f}; "
              f"MoD speed-up vs HF {measured:.2f}x, FLOP-predicted {predicted:.2f}x "
              f"(measured / predicted {measured / predicted:.2f}), weight-traffic-predicted "
              f"{traffic:.2f}x; a routed layer runs in "
              f"{results[B]['routed_layer_run_share_mean']:.2f} of steps; routed while decoding "
              f"{results[B]['decode_routed_fraction_mean']:.3f} (nominal prediction "
              f"{nominal:.2f}x); KV cache {last['mod'].kv_cache_ratio:.2f} of dense", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "args": vars(args), "shape": shape,
                       "torch": torch.__version__, "python": platform.python_version(),
                       "machine": platform.processor() or platform.machine(),
                       "date": time.strftime("%Y-%m-%d")}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
