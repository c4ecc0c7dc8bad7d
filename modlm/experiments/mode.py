"""Mixture-of-Depths-and-Experts at one FLOP budget (paper Sec 4.3, Fig 7).

Six models of the `small` preset's shape (d256, 6 layers, T 256, bytes), each trained on the
built-in corpus for the same 3e13 training FLOPs (about 3-5 minutes each on 2 cores; cheaper
models take more steps):

- dense:                the plain transformer;
- mod:                  MoD, capacity 12.5% on blocks 1, 3, 5 (the paper's best, Sec 4.1);
- moe:                  4 top-1 SwiGLU experts of the dense MLP's width in every block,
                        capacity factor 1.25, Switch balance loss and ST-MoE z-loss;
- mode-staged:          MoD routing in front of the blocks, MoE MLPs for the processed tokens;
- mode-integrated:      the MoE router also offers 4 no-op experts (a token sent to one skips the
                        MLP; attention unchanged): about half the MLP slots are computed;
- moe-reduced:          the paper's foil: MoE whose capacity factor is cut to 0.5 so it spends
                        integrated MoDE's MLP compute by dropping overflow tokens;
- mod-random, mode-staged-random: the random-routing controls of mod and mode-staged (the same
                        shape and capacity, tokens routed by a random top-k; Sec 4.1), so each
                        MoD result stands beside what computing less per step gives without a
                        router. Integrated MoDE has no MoD router (its no-op experts are chosen
                        by the MoE router), so it has no such control.

Reported: held-out loss in the training forward (`topk`: MoD top-k and expert capacity, the
objective of Fig 7) and in the inference forward (causal MoD routing by the predictor; no expert
capacity), forward FLOPs per sequence relative to dense, the MoE layers' computed / dropped /
no-op shares, and the training-step time of every model measured interleaved in one process.
"""

from __future__ import annotations

import statistics
from typing import Any

from modlm.config import ModelConfig
from modlm.experiments import sizes
from modlm.experiments.plan import interleaved_step_times
from modlm.experiments.runner import Context
from modlm.experiments.spec import Experiment, Report, RunResult, RunSpec
from modlm.experiments.tables import fmt, markdown_table

BUDGET = 3e13
BASE = "small"
VARIANTS = ("dense", "mod", "moe", "mode-staged", "mode-integrated", "moe-reduced",
            "mod-random", "mode-staged-random")
CONTROLS = {"mod": "mod-random", "mode-staged": "mode-staged-random"}
STEP_REPEATS = 6


def preset_name(variant: str) -> str:
    variant = variant.removesuffix("-random")
    return BASE if variant == "mod" else f"{BASE}-{variant}"


def model(variant: str) -> ModelConfig:
    from modlm.presets import get_preset
    cfg = get_preset(preset_name(variant))
    return sizes.random_control(cfg) if variant.endswith("-random") else cfg


def stage(ctx: Context, results: dict[str, RunResult] | None) -> list[RunSpec]:
    # The preset's name for the paper's models (their stored configs say so), a config for the
    # random controls.
    return [ctx.spec(variant, model(variant) if variant.endswith("-random")
                     else preset_name(variant), flops=ctx.budget(BUDGET),
                     family=variant, tags={"variant": variant}, evals=2)
            for variant in VARIANTS]


def _shares(r: RunResult, mode: str) -> dict[str, float] | None:
    layers = r.eval["val"][mode].get("moe")
    if not layers:
        return None
    return {k: statistics.fmean(m[k] for m in layers) for k in ("computed", "dropped", "noop")}


def report(ctx: Context, results: dict[str, RunResult]) -> Report:
    from modlm.experiments import plots
    # Keyed by the variant list: adding the random controls timed every model again together.
    times = ctx.cached(f"step_times_{len(VARIANTS)}",
                       lambda: interleaved_step_times(results, STEP_REPEATS))
    dense = results["dense"]
    rows, summary = [], {}
    for variant in VARIANTS:
        r = results[variant]
        shares = _shares(r, "topk")
        entry: dict[str, Any] = {
            "preset": preset_name(variant) + (" + random router" if variant.endswith("-random")
                                              else ""), "params": r.params,
            "forward_flops_over_dense": r.forward_flops / dense.forward_flops,
            "steps": r.steps, "step_s": times[variant],
            "step_time_over_dense": times[variant] / times["dense"],
            "loss_training_forward": r.loss("topk"),
            "inference_mode": r.headline_mode, "loss_inference_forward": r.headline_loss,
            "mlp_shares_training_forward": shares}
        summary[variant] = entry
        rows.append([
            variant, f"`{preset_name(variant)}`" + entry["preset"][len(preset_name(variant)):],
            f"{r.params / 1e6:.2f}M",
            f"{entry['forward_flops_over_dense']:.3f}", r.steps, f"{times[variant] * 1e3:.0f}",
            f"{entry['step_time_over_dense']:.3f}", fmt(r.loss("topk")),
            f"{fmt(r.headline_loss)} ({r.headline_mode})",
            "-" if shares is None else " / ".join(f"{shares[k]:.2f}"
                                                  for k in ("computed", "dropped", "noop"))])
    points = {v: [(summary[v]["forward_flops_over_dense"], summary[v]["loss_training_forward"],
                   v)] for v in VARIANTS}
    plots.scatter_families(points, ctx.figure("mode"),
                           xlabel="forward FLOPs per sequence / dense",
                           ylabel="held-out loss, training forward (nats/byte)",
                           title=f"MoDE at {ctx.budget(BUDGET):.0e} training FLOPs (Fig 7)",
                           logx=False)
    best = min(VARIANTS, key=lambda v: summary[v]["loss_training_forward"])
    integ, foil = summary["mode-integrated"], summary["moe-reduced"]
    table = markdown_table(
        ["model", "preset", "params", "fwd FLOPs / dense", "steps", "step ms",
         "step time / dense", "loss, training fwd", "loss, inference fwd",
         "MLP slots computed / dropped / no-op"], rows, "lllrrrrrll")
    text = "\n".join([
        f"Budget {ctx.budget(BUDGET):.0e} training FLOPs per model; held-out loss on "
        f"{ctx.windows} windows of 256 bytes of the held-out plays. Step time: median "
        f"of {STEP_REPEATS} interleaved training steps per model, measured after training in "
        "one process.", "", table, "", "![MoDE](figures/mode.png)", "",
        f"- Lowest loss in the training forward: **{best}**.",
        f"- Integrated MoDE minus the reduced-capacity foil (same expected MLP compute), "
        f"training forward: {integ['loss_training_forward'] - foil['loss_training_forward']:+.4f}"
        f"; inference forward: "
        f"{integ['loss_inference_forward'] - foil['loss_inference_forward']:+.4f}.",
        f"- Staged MoDE minus MoD: {summary['mode-staged']['loss_training_forward'] - summary['mod']['loss_training_forward']:+.4f}; "  # noqa: E501
        f"MoE minus dense: {summary['moe']['loss_training_forward'] - summary['dense']['loss_training_forward']:+.4f}.",  # noqa: E501
        *[f"- {v} minus its random-routing control ({c}): training forward "
          f"{summary[v]['loss_training_forward'] - summary[c]['loss_training_forward']:+.4f}, "
          f"inference forward {summary[v]['loss_inference_forward'] - summary[c]['loss_inference_forward']:+.4f} "  # noqa: E501
          f"(one seed; the controls experiment measures the seed spread at d128)."
          for v, c in CONTROLS.items()],
    ])
    return Report(text, {"variants": summary, "best": best})


EXPERIMENT = Experiment(
    name="mode",
    title="MoDE: dense, MoD, MoE, staged and integrated MoDE, reduced-capacity MoE at one budget",
    description=__doc__.split("\n", 1)[1].strip(),
    stages=(stage,),
    report=report,
    extra_minutes=1.0,
)
