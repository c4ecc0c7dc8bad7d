"""Routing analysis (paper Fig 1 and Fig 5) on held-out text.

One MoD model with six routed blocks (d128, 12 layers, capacity 12.5% on blocks 1, 3, ..., 11,
aux loss and predictor) is trained for 3e13 FLOPs, then run over held-out plays in top-k mode
(the training forward) and predictor mode (causal). Reported:

- a heatmap of routing decisions, routed block x position, on a stretch of real text with its
  characters (Fig 1 / Fig 5 left);
- histograms of the router weights sigmoid(r) per block and the share above 0.5 (Fig 5: with
  the aux loss about the capacity, 12.5%, sits above 0.5);
- how many routed blocks each token went through against the entropy of the model's prediction
  at that token, with Pearson and Spearman correlations (the paper: tokens that use more blocks
  go with higher-entropy predictions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from modlm.config import ModelConfig
from modlm.experiments import sizes
from modlm.experiments.runner import Context
from modlm.experiments.spec import Experiment, Report, RunResult, RunSpec
from modlm.experiments.tables import fmt, markdown_table

BUDGET = 3e13
WIDTH, DEPTH, HEADS = 128, 12, 4
ANALYSIS_WINDOWS = 64   # held-out windows of 256 bytes analysed (16,384 tokens)
HEATMAP_WINDOW = 5      # which of them the heatmap shows
HEATMAP_CHARS = 112     # how many of its positions
MODES = ("topk", "predictor")


def model() -> ModelConfig:
    return dataclasses.replace(sizes.dense_model(WIDTH, DEPTH, HEADS), routing=sizes.MOD_ROUTING)


def stage(ctx: Context, results: dict[str, RunResult] | None) -> list[RunSpec]:
    cfg = model()
    return [ctx.spec(f"mod-{sizes.shape(cfg)}", cfg, family="mod", flops=ctx.budget(BUDGET),
                     keep_checkpoint=True, tags={"budget": BUDGET})]


def analyse(ctx: Context, run: RunResult) -> dict[str, Any]:
    """Routing records of the trained model on held-out windows, summarised (JSON)."""
    from modlm.data import eval_batches, split_windows
    from modlm.experiments import analysis
    net, tokenizer = ctx.load_model(run)
    data = ctx.data()
    n_windows = min(ANALYSIS_WINDOWS, ctx.windows)
    out: dict[str, Any] = {"windows": n_windows}
    for mode in MODES:
        windows = [split_windows(w).inputs for w in
                   eval_batches(data.val, batch_size=16, seq_len=run.seq_len,
                                max_batches=-(-n_windows // 16))]
        rec = analysis.collect_routing(net, windows, mode)
        out[mode] = analysis.summarise(rec)
        row = min(HEATMAP_WINDOW, rec.ids_BT.shape[0] - 1)
        ids = rec.ids_BT[row, :HEATMAP_CHARS].tolist()
        out[mode]["heatmap"] = {"row": row, "ids": ids,
                                "chars": [tokenizer.decode([i]) for i in ids],
                                "mask": rec.mask_LBT[:, row, :HEATMAP_CHARS].int().tolist()}
    return out


def report(ctx: Context, results: dict[str, RunResult]) -> Report:
    from modlm.experiments import plots
    (run,) = results.values()
    a = ctx.cached("routing_analysis", lambda: analyse(ctx, run))
    layers = a["topk"]["layers"]
    plots.routing_heatmap(
        {f"{m} ({'causal' if m != 'topk' else 'training forward, not causal'})":
         a[m]["heatmap"]["mask"] for m in MODES},
        a["topk"]["heatmap"]["chars"], layers, ctx.figure("routing_heatmap"),
        title="Routing decisions on held-out text (dark: the token went through the block)")
    h = a["topk"]["weight_histogram"]
    plots.histograms(h["counts"], h["edges"], [f"block {l}" for l in layers],
                     ctx.figure("router_weights"), xlabel="router weight sigmoid(r)", vline=0.5,
                     title="Router weights on held-out text")
    for m in MODES:
        buckets = a[m]["entropy_by_blocks_used"]
        plots.bars([str(b["blocks"]) for b in buckets], [b["mean_entropy"] for b in buckets],
                   ctx.figure(f"entropy_by_blocks_{m}"), ylabel="mean prediction entropy (nats)",
                   annotations=[f"n={b['tokens']}" for b in buckets],
                   xlabel="routed blocks the token went through",
                   title=f"{m}: routed blocks used vs entropy (Spearman "
                         f"{a[m]['spearman_blocks_entropy']:+.3f})")
    rows = []
    for m in MODES:
        for which, key, buckets in (
                ("at the token (of the next)", "", "entropy_by_blocks_used"),
                ("of the token (at the previous)", "_of_token", "entropy_of_token_by_blocks_used")):
            rows.append([m, which, fmt(a[m][f"pearson_blocks_entropy{key}"], 3),
                         fmt(a[m][f"spearman_blocks_entropy{key}"], 3),
                         ", ".join(f"{b['blocks']}: {b['mean_entropy']:.3f} ({b['tokens']})"
                                   for b in a[m][buckets] if b["tokens"])])
    table = markdown_table(["mode", "prediction entropy", "Pearson r", "Spearman rho",
                            "mean entropy (nats) by blocks used (tokens)"], rows, "llrrl")
    routed = markdown_table(
        ["mode", f"routed per block {layers}"],
        [[m, ", ".join(f"{x:.3f}" for x in a[m]["routed_fraction_per_layer"])] for m in MODES],
        "ll")
    above = ", ".join(f"{x:.3f}" for x in a["topk"]["weight_above_half_per_layer"])
    text = "\n".join([
        f"Run `{run.name}`: {run.params:,d} parameters, {run.steps} steps; held-out loss "
        f"{fmt(run.loss('topk'))} (top-k), {fmt(run.loss('predictor'))} (predictor). Analysis on "
        f"{a['topk']['tokens']:,d} held-out tokens ({a['windows']} windows of {run.seq_len}).", "",
        "![routing heatmap](figures/routing_heatmap.png)", "",
        routed, "",
        "## Blocks used vs prediction entropy", "",
        "Per held-out token: how many of the routed blocks it went through, against the entropy "
        "of the model's next-token distribution at it (the paper's measure) and, as a second "
        "reading, at the position before it (how uncertain the model was about the token "
        "itself). A positive correlation is the paper's finding.", "", table, "",
        "![entropy by blocks used, top-k](figures/entropy_by_blocks_topk.png)", "",
        "![entropy by blocks used, predictor](figures/entropy_by_blocks_predictor.png)", "",
        "## Router weights", "",
        f"Share of router weights above 0.5 per block {layers}: {above} (capacity "
        f"{sizes.MOD_ROUTING.capacity}).", "",
        "![router weights](figures/router_weights.png)"])
    summary = {m: {k: v for k, v in a[m].items() if k != "heatmap"} for m in MODES}
    summary["run"] = run.name
    return Report(text, summary)


EXPERIMENT = Experiment(
    name="routing",
    title="Routing analysis: heatmap, router weights, blocks used vs entropy (paper Fig 1, 5)",
    description=__doc__.split("\n", 1)[1].strip(),
    stages=(stage,),
    report=report,
    extra_minutes=1.0,
)
