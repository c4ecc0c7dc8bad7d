"""Speed and memory in one run: dense vs same-shape MoD, beside the FLOP-predicted ratios.

Models: d256, 8 layers, 4 heads, context 1024, bytes; the MoD model routes blocks 1, 3, 5, 7 at
12.5% and is first trained for 200 steps (16 x 256 tokens) so that its causal rules route about
the capacity (an untrained router routes arbitrarily); the dense model's speed does not depend
on its weights, so it is timed untrained. Both models are timed in this one process,
interleaved, medians (modlm.measure):

- training step: forward, backward, clipping and AdamW on 16 x 256 tokens (10 rounds);
- prefill: 4 held-out prompts of 512 bytes in predictor mode (5 rounds);
- decode: 256 new tokens sampled at temperature 1 (seed 0) after 256-byte prompts, batch 1 and
  batch 8 (3 rounds); tokens/s of the decode steps only;
- peak memory: resident-set growth of two training steps, each model in a fresh process;
- KV cache: bytes the caches hold after decoding (batch 8) against a dense cache.

Predicted ratios come from modlm.flops: training FLOPs per sequence; forward FLOPs at the
routed fraction the causal rule actually produced (prefill, decode); and for the KV cache the
share of (block, token) pairs cached at the nominal capacity.
"""

from __future__ import annotations

import statistics
from typing import Any

from modlm import flops
from modlm.config import ModelConfig
from modlm.experiments import sizes
from modlm.experiments.runner import Context
from modlm.experiments.spec import Experiment, Report, RunResult, RunSpec
from modlm.experiments.tables import markdown_table
from modlm.presets import dense

TRAIN_STEPS = 200
SHAPE = dict(vocab_size=256, d_model=256, n_layers=8, n_heads=4, max_seq_len=1024)
STEP_BATCH, STEP_T = 16, 256
PREFILL_BATCH, PREFILL_T = 4, 512
DECODE_PROMPT, DECODE_NEW = 256, 256
MODE = "predictor"


def mod_model() -> ModelConfig:
    return ModelConfig(**SHAPE, routing=sizes.MOD_ROUTING)


def stage(ctx: Context, results: dict[str, RunResult] | None) -> list[RunSpec]:
    return [ctx.spec("mod", mod_model(), family="mod", steps=ctx.steps(TRAIN_STEPS),
                     keep_checkpoint=True)]


def _prompts(ctx: Context, n: int, length: int) -> list[list[int]]:
    val = ctx.data().val
    stride = max(1, (len(val) - length) // max(1, n))
    return [[int(t) for t in val[i * stride: i * stride + length]] for i in range(n)]


def measure(ctx: Context, run: RunResult) -> dict[str, Any]:
    import torch

    from modlm import measure as m
    from modlm.generate import Engine
    from modlm.model import MoDLM
    from modlm.optim import build_optimizer
    mod, _ = ctx.load_model(run)
    torch.manual_seed(0)
    twin = MoDLM(dense(mod.cfg)).eval()
    models = {"dense": twin, "mod": mod}
    scale = min(1.0, ctx.options.budget_scale)
    rounds = lambda n: max(1, round(n * scale))  # noqa: E731 - shrink with --budget-scale
    lengths = {"prefill": max(16, round(PREFILL_T * scale)),
               "prompt": max(16, round(DECODE_PROMPT * scale)),
               "new": max(8, round(DECODE_NEW * scale))}

    # Training step: full optimizer steps, interleaved (weights change; speed does not).
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (STEP_BATCH, STEP_T + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    train_copies = {}
    for name, net in models.items():
        c = MoDLM(net.cfg)
        c.load_state_dict(net.state_dict())
        c.train()
        train_copies[name] = (c, build_optimizer(c, lr=1e-4, weight_decay=0.1,
                                                 betas=(0.9, 0.95), eps=1e-8))
    step = m.interleaved({n: (lambda c=c, o=o: m.train_step_seconds(c, x, y, o))
                          for n, (c, o) in train_copies.items()}, repeats=rounds(10), warmup=2)
    del train_copies

    engines = {n: Engine(net, mode=MODE) for n, net in models.items()}
    prefill_prompts = _prompts(ctx, PREFILL_BATCH, lengths["prefill"])
    prefill = m.interleaved({n: (lambda e=e: m.prefill_seconds(e, prefill_prompts))
                             for n, e in engines.items()}, repeats=rounds(5), warmup=1)
    with torch.no_grad():
        out = mod(torch.tensor(prefill_prompts), mode=MODE)
    prefill_routed = [float(r.fraction) for r in out.routing]

    decode: dict[str, Any] = {}
    for B in (1, 8):
        prompts = _prompts(ctx, B, lengths["prompt"])
        last: dict[str, Any] = {}

        def gen(name: str, prompts=prompts, last=last) -> float:
            last[name] = engines[name].generate(prompts, lengths["new"], temperature=1.0,
                                                seed=0)
            return last[name].decode_tokens_per_s
        tps = m.interleaved({n: (lambda n=n: gen(n)) for n in engines}, repeats=rounds(3),
                            warmup=1)
        r = last["mod"]
        decode[str(B)] = {
            "tokens_per_s": m.medians(tps), "samples": tps,
            "decode_routed_fraction": {str(k): v for k, v in r.decode_routed_fraction.items()},
            "routed_fraction": {str(k): v for k, v in r.routed_fraction.items()},
            "kv_cache_bytes": {n: last[n].kv_cache_bytes for n in last},
            "dense_kv_cache_bytes": r.dense_kv_cache_bytes,
            "kv_cache_ratio": r.kv_cache_ratio}
    memory = {n: m.step_memory(net.cfg, STEP_BATCH, STEP_T, ctx.options.threads)
              for n, net in models.items()}
    return {"train_step_s": step, "prefill_s": prefill, "prefill_routed_fraction": prefill_routed,
            "decode": decode, "memory": memory, "threads": torch.get_num_threads(),
            "lengths": lengths}


def _at_capacity(cfg: ModelConfig, fraction: float) -> ModelConfig:
    """The MoD config with its capacity set to an observed routed fraction (for FLOPs)."""
    return sizes.with_routing(cfg, capacity=min(1.0, max(fraction, 1e-3)))


def report(ctx: Context, results: dict[str, RunResult]) -> Report:
    run = results["mod"]
    meas = ctx.cached("speed", lambda: measure(ctx, run))
    mod_cfg = run.model_config
    dense_cfg = dense(mod_cfg)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    rows, summary = [], {}

    step = {n: med(v) for n, v in meas["train_step_s"].items()}
    pred = flops.training_flops(mod_cfg, STEP_T) / flops.training_flops(dense_cfg, STEP_T)
    rows.append(["training step (16 x 256), ms", f"{step['dense'] * 1e3:.1f}",
                 f"{step['mod'] * 1e3:.1f}", f"{step['mod'] / step['dense']:.3f}",
                 f"{pred:.3f} (training FLOPs)"])
    summary["train_step"] = {"dense_s": step["dense"], "mod_s": step["mod"],
                             "time_ratio": step["mod"] / step["dense"], "flop_ratio": pred}

    L = meas["lengths"]
    pre = {n: PREFILL_BATCH * L["prefill"] / med(v) for n, v in meas["prefill_s"].items()}
    f_pre = statistics.fmean(meas["prefill_routed_fraction"])
    pred = (flops.forward_flops(dense_cfg, L["prefill"]).total
            / flops.forward_flops(_at_capacity(mod_cfg, f_pre), L["prefill"]).total)
    rows.append([f"prefill tokens/s ({PREFILL_BATCH} x {L['prefill']}, {MODE})",
                 f"{pre['dense']:,.0f}", f"{pre['mod']:,.0f}",
                 f"{pre['mod'] / pre['dense']:.2f}x",
                 f"{pred:.2f}x (forward FLOPs at routed fraction {f_pre:.3f})"])
    summary["prefill"] = {"tokens_per_s": pre, "speedup": pre["mod"] / pre["dense"],
                          "flop_speedup": pred, "routed_fraction": f_pre}

    for B, d in meas["decode"].items():
        tps = d["tokens_per_s"]
        f_dec = statistics.fmean(d["decode_routed_fraction"].values())
        T = L["prompt"] + L["new"]
        pred = (flops.forward_flops(dense_cfg, T).total
                / flops.forward_flops(_at_capacity(mod_cfg, f_dec), T).total)
        rows.append([f"decode tokens/s, batch {B} ({L['new']} new after {L['prompt']})",
                     f"{tps['dense']:,.1f}", f"{tps['mod']:,.1f}",
                     f"{tps['mod'] / tps['dense']:.2f}x",
                     f"{pred:.2f}x (forward FLOPs at routed fraction {f_dec:.3f})"])
        summary[f"decode_batch_{B}"] = {"tokens_per_s": tps, "speedup": tps["mod"] / tps["dense"],
                                        "flop_speedup": pred, "routed_fraction": f_dec}

    mem = {n: v["step_increase_mib"] for n, v in meas["memory"].items()}
    rows.append(["peak memory added by 2 training steps, MiB", f"{mem['dense']:.0f}",
                 f"{mem['mod']:.0f}", f"{mem['mod'] / mem['dense']:.2f}", "-"])
    summary["memory"] = meas["memory"]
    kv = meas["decode"]["8"]
    n_routed = len(mod_cfg.routed_layers)
    kv_pred = (mod_cfg.n_layers - n_routed + n_routed * mod_cfg.routing.capacity) / mod_cfg.n_layers
    rows.append(["KV cache after decoding (batch 8), KiB",
                 f"{kv['kv_cache_bytes']['dense'] / 1024:,.0f}",
                 f"{kv['kv_cache_bytes']['mod'] / 1024:,.0f}", f"{kv['kv_cache_ratio']:.3f}",
                 f"{kv_pred:.3f} (blocks x tokens cached at capacity)"])
    summary["kv_cache"] = {"bytes": kv["kv_cache_bytes"], "ratio": kv["kv_cache_ratio"],
                           "predicted_ratio": kv_pred}
    table = markdown_table(["measure", "dense", "MoD", "MoD / dense (measured)",
                            "FLOP-predicted"], rows, "lrrrl")
    text = "\n".join([
        f"d_model {mod_cfg.d_model}, {mod_cfg.n_layers} layers, routed blocks "
        f"{list(mod_cfg.routed_layers)} at capacity {mod_cfg.routing.capacity}; MoD trained "
        f"{run.steps} steps (held-out loss {run.loss('predictor'):.4f}, predictor mode); float32, "
        f"{meas['threads']} threads; medians of interleaved rounds.", "", table, "",
        "Speed-ups above 1 favour MoD; the FLOP prediction is the upper bound a perfectly "
        "compute-bound implementation would reach."])
    return Report(text, summary)


EXPERIMENT = Experiment(
    name="speed",
    title="Speed and memory: training step, prefill, decode, peak memory, KV cache",
    description=__doc__.split("\n", 1)[1].strip(),
    stages=(stage,),
    report=report,
    extra_minutes=1.0,
)
