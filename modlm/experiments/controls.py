"""Controls at one budget (paper Sec 4.1, Fig 3; Sec 3.5 on the auxiliary loss).

All runs get the same training budget, 1e13 FLOPs (the middle isoFLOP budget: each run takes
1-2 minutes on 2 cores). The reference MoD model is the isoFLOP twin of the dense
d128-l4 model (d128-l7: capacity 12.5% on blocks 1, 3, 5, aux loss and predictor); each control
changes one thing:

- random:         the stochastic-routing control (top-k of Gaussian scores; Sec 4.1 found it
                  drastically worse than both learned routing and the dense baseline);
- all-blocks:     routing every block after block 0 instead of every other (Sec 4.1: worse);
- capacity-0.5 and capacity-0.0625: more and less capacity than 12.5% (Sec 4.1: 12.5% best,
                  lower capacities worse);
- no-aux:         the auxiliary BCE loss off (Sec 3.5: it costs 0.2-0.3% of the LM objective);
- dense:          the isoFLOP-matched dense model (d128-l4).

The reference MoD, no-aux and dense runs are trained with seeds 0 and 1 so the aux-loss effect
can be read against the seed-to-seed spread. Every run is evaluated in top-k and its causal
modes; the headline is the causal mode (predictor; router for the random control).
"""

from __future__ import annotations

import statistics
from typing import Any

from modlm.experiments import sizes
from modlm.experiments.runner import Context
from modlm.experiments.spec import Experiment, Report, RunResult, RunSpec
from modlm.experiments.tables import fmt, markdown_table

BUDGET = 1e13
DENSE_RUNG = (128, 4, 4)
SEEDS = (0, 1)


def variants() -> dict[str, Any]:
    """Variant name -> model config."""
    dense = sizes.dense_model(*DENSE_RUNG)
    mod = sizes.mod_twin(dense)
    return {
        "mod": mod,
        "random": sizes.random_control(mod),
        "all-blocks": sizes.with_routing(mod, layers="all"),
        "capacity-0.5": sizes.with_routing(mod, capacity=0.5),
        "capacity-0.0625": sizes.with_routing(mod, capacity=0.0625),
        "no-aux": sizes.with_routing(mod, aux_loss_weight=0.0),
        "dense": dense,
    }


SEEDED = ("mod", "no-aux", "dense")


def stage(ctx: Context, results: dict[str, RunResult] | None) -> list[RunSpec]:
    specs = []
    for variant, cfg in variants().items():
        for seed in (SEEDS if variant in SEEDED else SEEDS[:1]):
            specs.append(ctx.spec(f"{variant}-s{seed}", cfg, seed=seed, flops=ctx.budget(BUDGET),
                                  family="dense" if variant == "dense" else "mod",
                                  tags={"variant": variant, "seed": seed}))
    return specs


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def report(ctx: Context, results: dict[str, RunResult]) -> Report:
    from modlm.experiments import plots
    by_variant: dict[str, list[RunResult]] = {}
    for r in results.values():
        by_variant.setdefault(r.tags["variant"], []).append(r)
    ref = by_variant["mod"]
    ref_loss = _mean([r.headline_loss for r in ref])
    dense_fwd = by_variant["dense"][0].forward_flops
    rows, summary_rows = [], {}
    for variant, runs in by_variant.items():
        r0 = runs[0]
        cfg = r0.model_config
        head = [r.headline_loss for r in runs]
        topk = [r.loss("topk") for r in runs]
        entry = {
            "runs": [r.name for r in runs], "routed_blocks": list(cfg.routed_layers),
            "capacity": None if cfg.is_dense else cfg.routing.capacity,
            "params": r0.params, "forward_flops_over_dense": r0.forward_flops / dense_fwd,
            "steps": r0.steps, "median_step_s": statistics.median(r.median_step_s for r in runs),
            "headline_mode": r0.headline_mode, "headline_loss": head, "topk_loss": topk,
            "headline_minus_mod": _mean(head) - ref_loss,
        }
        summary_rows[variant] = entry
        rows.append([
            variant, "dense" if cfg.is_dense else
            f"{cfg.routing.router}, blocks {','.join(map(str, cfg.routed_layers))}, "
            f"capacity {cfg.routing.capacity:g}, aux {cfg.routing.aux_loss_weight:g}",
            f"{r0.params:,d}", f"{r0.forward_flops / dense_fwd:.2f}", r0.steps,
            f"{entry['median_step_s'] * 1e3:.0f}",
            " / ".join(fmt(x) for x in topk),
            " / ".join(fmt(x) for x in head) + f" ({r0.headline_mode})",
            f"{entry['headline_minus_mod']:+.4f}"])

    # The auxiliary loss: its weighted share of the objective, and what turning it off changes.
    on, off = sorted(ref, key=lambda r: r.seed), sorted(by_variant["no-aux"], key=lambda r: r.seed)
    pairs = [(a, b) for a in on for b in off if a.seed == b.seed]
    aux = {
        "aux_share_of_lm_loss": [r.aux_share for r in on],
        "lm_loss_on_minus_off_predictor": [a.loss("predictor") - b.loss("predictor")
                                           for a, b in pairs],
        "lm_loss_on_minus_off_topk": [a.loss("topk") - b.loss("topk") for a, b in pairs],
        "train_lm_loss_on_minus_off": [a.train_lm_loss - b.train_lm_loss for a, b in pairs],
        "seed_spread_mod_predictor": [r.loss("predictor") for r in on],
    }
    aux["relative_on_minus_off_predictor"] = [d / b.loss("predictor") for d, (_, b) in
                                              zip(aux["lm_loss_on_minus_off_predictor"], pairs)]
    plots.bars([v for v in summary_rows],
               [_mean(e["headline_loss"]) for e in summary_rows.values()],
               ctx.figure("controls"), ylabel="held-out loss, causal mode (nats/byte)",
               annotations=[f"{_mean(e['headline_loss']):.3f}" for e in summary_rows.values()],
               title=f"Controls at {ctx.budget(BUDGET):.0e} training FLOPs (mean over seeds)")
    table = markdown_table(
        ["variant", "routing", "params", "fwd FLOPs / dense", "steps", "step ms",
         "loss top-k (per seed)", "loss causal (per seed)", "causal - mod (mean)"], rows,
        "lllrrrlll")
    share = ", ".join(f"{100 * x:.2f}%" for x in aux["aux_share_of_lm_loss"] if x is not None)
    diff = ", ".join(f"{x:+.4f} ({100 * y:+.2f}%)" for x, y in
                     zip(aux["lm_loss_on_minus_off_predictor"],
                         aux["relative_on_minus_off_predictor"]))
    text = "\n".join([
        f"Budget {ctx.budget(BUDGET):.0e} training FLOPs per run; held-out loss on "
        f"{ctx.windows} windows of 256 bytes of the held-out plays. Values per seed are "
        "separated by /.", "", table, "", "![controls](figures/controls.png)", "",
        "## The auxiliary loss", "",
        f"- Weighted router BCE as a share of the training LM loss (last fifth of training, "
        f"per seed): {share or '-'}.",
        f"- Held-out LM loss with the aux loss minus without it (predictor mode, paired by "
        f"seed): {diff or '-'}; top-k mode: "
        f"{', '.join(f'{x:+.4f}' for x in aux['lm_loss_on_minus_off_topk'])}.",
        f"- Seed-to-seed spread of the reference MoD (predictor): "
        f"{', '.join(fmt(x) for x in aux['seed_spread_mod_predictor'])}.",
    ])
    return Report(text, {"variants": summary_rows, "aux_loss": aux})


EXPERIMENT = Experiment(
    name="controls",
    title="Controls at one budget: random routing, every block, capacity, the aux loss",
    description=__doc__.split("\n", 1)[1].strip(),
    stages=(stage,),
    report=report,
    extra_minutes=2.0,
)
