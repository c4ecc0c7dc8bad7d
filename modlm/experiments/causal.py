"""Causal routing quality (paper Sec 3.5 and 4.2, Fig 6).

Top-k routing is not causal, so a sampler routes each token alone: by the router's own rule
(sigmoid(r) > 0.5, trained by the auxiliary loss) or by the stop-gradient predictor. The paper
reports the predictor's accuracy against top-k membership ("upwards of 97% soon into training",
99% later) and that switching from top-k to the causal rule on held-out data costs little loss.

One MoD model (d128-l10, the isoFLOP twin of dense d128-l6) is trained for 3e13 FLOPs with 16
held-out evaluations along the way. Reported: predictor and router accuracy against top-k per
routed block over training (held-out windows, and the training batches), and the held-out loss
in top-k, router and predictor mode on the same tokens at the end, with the fraction of tokens
each causal rule routes.
"""

from __future__ import annotations

from typing import Any

from modlm.experiments import sizes
from modlm.experiments.runner import Context, metrics
from modlm.experiments.spec import Experiment, Report, RunResult, RunSpec
from modlm.experiments.tables import fmt, markdown_table

BUDGET = 3e13
DENSE_RUNG = (128, 6, 4)
EVALS = 16
MODES = ("topk", "router", "predictor")


def stage(ctx: Context, results: dict[str, RunResult] | None) -> list[RunSpec]:
    mod = sizes.mod_twin(sizes.dense_model(*DENSE_RUNG))
    return [ctx.spec(f"mod-{sizes.shape(mod)}", mod, family="mod", flops=ctx.budget(BUDGET),
                     evals=EVALS, train={"eval_batches": 2}, tags={"budget": BUDGET})]


def report(ctx: Context, results: dict[str, RunResult]) -> Report:
    from modlm.experiments import plots
    (run,) = results.values()
    records = metrics(run, ctx.root)
    evals = [r for r in records if "eval" in r]
    steps_logged = [r for r in records if "eval" not in r and r.get("predictor_accuracy")]
    layers = [l["layer"] for l in evals[-1]["eval"]["val"]["topk"]["layers"]]
    series: dict[str, tuple[list[float], list[float]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for j, layer in enumerate(layers):
        xs = [r["step"] for r in evals]
        for rule, dash in (("predictor", "-"), ("router", "--")):
            label = f"{rule}, block {layer} (held-out)"
            series[label] = (
                xs, [r["eval"]["val"]["topk"]["layers"][j][f"{rule}_accuracy"] for r in evals])
            styles[label] = {"color": f"C{j % 10}", "linestyle": dash}
    train_acc = {
        "steps": [r["step"] for r in steps_logged],
        "mean_predictor_accuracy": [sum(r["predictor_accuracy"]) / len(r["predictor_accuracy"])
                                    for r in steps_logged]}
    label = "predictor, mean over blocks (training batches)"
    series[label] = (train_acc["steps"], train_acc["mean_predictor_accuracy"])
    styles[label] = {"color": "black", "linewidth": 0.8, "alpha": 0.6}
    plots.lines(series, ctx.figure("causal_accuracy"), xlabel="optimizer step",
                ylabel="agreement with top-k membership",
                title="Causal rules vs top-k over training (Fig 6); solid: predictor, "
                      "dashed: router", hline=0.97, ylim=(0.85, 1.0), styles=styles)
    loss_series = {m: ([r["step"] for r in evals], [r["eval"]["val"][m]["loss"] for r in evals])
                   for m in MODES}
    plots.lines(loss_series, ctx.figure("causal_loss"), xlabel="optimizer step",
                ylabel="held-out loss (nats/byte)", title="Held-out loss by routing mode")

    rows = []
    gaps: dict[str, Any] = {}
    for split in ("val", "pydoc"):
        ev = run.eval[split]
        for m in MODES:
            r = ev[m]
            gap = r["loss"] - ev["topk"]["loss"]
            gaps[f"{split}/{m}"] = gap
            rows.append([split, m, fmt(r["loss"]), fmt(r["bpb"], 3),
                         "-" if m == "topk" else f"{gap:+.4f}",
                         ", ".join(f"{l['fraction_routed']:.3f}" for l in r["layers"]),
                         ", ".join(fmt(l["predictor_accuracy"], 3) for l in r["layers"])
                         if m == "topk" else "",
                         ", ".join(fmt(l["router_accuracy"], 3) for l in r["layers"])
                         if m == "topk" else ""])
    first_97 = {}
    for j, layer in enumerate(layers):
        hit = [r["step"] for r in evals
               if r["eval"]["val"]["topk"]["layers"][j]["predictor_accuracy"] >= 0.97]
        first_97[layer] = hit[0] if hit else None
    table = markdown_table(
        ["split", "mode", "loss", "bpb", "loss - top-k", f"routed per block {layers}",
         "predictor accuracy", "router accuracy"], rows, "llrrrlll")
    text = "\n".join([
        f"Run `{run.name}`: {run.params:,d} parameters, {run.steps} steps, "
        f"{run.train_flops:.3g} training FLOPs. Final evaluation on {ctx.windows} "
        f"held-out windows (val) and {min(64, ctx.windows)} pydoc windows; every mode "
        "sees the same tokens.", "", table, "",
        f"First of the {len(evals)} evaluations during training (32 held-out windows each) at "
        "which the predictor agrees with top-k >= 97%, per block: "
        + ", ".join(f"block {k}: step {v if v is not None else 'never'}"
                    for k, v in first_97.items()) + f" (of {run.steps}). For scale: a rule that "
        f"routes nothing agrees with top-k on 1 - capacity = "
        f"{1 - run.model_config.routing.capacity:.1%} of tokens.", "",
        "![accuracy over training](figures/causal_accuracy.png)", "",
        "![loss by mode over training](figures/causal_loss.png)"])
    summary = {"run": run.name, "steps": run.steps, "loss_gap_vs_topk": gaps,
               "first_step_predictor_97": first_97,
               "final": {s: {m: run.eval[s][m] for m in MODES} for s in ("val", "pydoc")},
               "eval_history": [{"step": r["step"], "val": r["eval"]["val"]} for r in evals],
               "train_predictor_accuracy": train_acc}
    return Report(text, summary)


EXPERIMENT = Experiment(
    name="causal",
    title="Causal routing quality: predictor and router vs top-k (paper Fig 6)",
    description=__doc__.split("\n", 1)[1].strip(),
    stages=(stage,),
    report=report,
    extra_minutes=2.0,
)
