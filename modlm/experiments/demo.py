"""The main job: a MoD model against its isoFLOP dense baseline, end to end, in about 10 minutes.

Both models have the `small` preset's shape (d256, 6 layers, T 256, bytes); the MoD model routes
blocks 1, 3, 5 at 12.5% capacity with both causal fixes, the dense baseline routes nothing. Both
are trained on the built-in Shakespeare corpus for the same 3e13 training FLOPs (modlm.flops
turns the budget into steps, so MoD, cheaper per step, takes more steps in the same compute), then
evaluated on held-out plays in every routing mode (the causal ones are what a sampler can use),
sampled from (MoD in predictor mode), and the MoD model's routing decisions on held-out text are
drawn as a heatmap. One seed: a demonstration, not evidence (see the isoflop experiment for
that).
"""

from __future__ import annotations

from typing import Any

from modlm.experiment import (
    Context,
    Experiment,
    Report,
    RunResult,
    RunSpec,
    fmt,
    interleaved_step_times,
    markdown_table,
    ms,
    results_table,
)

BUDGET = 3e13
PROMPTS = ("ROSALIND:\n", "SHYLOCK:\n", "TALBOT:\n")  # speakers of the three held-out plays
NEW_TOKENS = 160
HEATMAP_CHARS = 112
STEP_REPEATS = 10


def stage(ctx: Context, results: dict[str, RunResult] | None) -> list[RunSpec]:
    return [ctx.spec("mod", "small", family="mod", flops=ctx.budget(BUDGET), keep_checkpoint=True),
            ctx.spec("dense", "small-dense", family="dense", flops=ctx.budget(BUDGET),
                     keep_checkpoint=True)]


def extras(ctx: Context, results: dict[str, RunResult]) -> dict[str, Any]:
    """Samples from both models and the MoD model's routing on one held-out window."""
    import torch

    from modlm.analysis import collect_routing
    from modlm.generate import Engine
    out: dict[str, Any] = {"samples": {}}
    for name in ("mod", "dense"):
        model, tokenizer = ctx.load_model(results[name])
        gen = Engine(model, mode="predictor").generate_text(
            tokenizer, list(PROMPTS), NEW_TOKENS, temperature=0.8, top_p=0.95, seed=0)
        out["samples"][name] = [p + t for p, t in zip(PROMPTS, gen.texts)]
        if name == "mod":
            val = ctx.data().val
            start = len(val) // 3
            ids = torch.tensor(val[start: start + HEATMAP_CHARS], dtype=torch.long)[None]
            modes = {}
            for mode in ("topk", "predictor"):
                rec = collect_routing(model, [ids], mode)
                modes[mode] = rec.mask_LBT[:, 0].int().tolist()
            out["heatmap"] = {"layers": list(rec.layers), "masks": modes,
                              "chars": [tokenizer.decode([i]) for i in ids[0].tolist()]}
    return out


def report(ctx: Context, results: dict[str, RunResult]) -> Report:
    from modlm import plots
    mod, dense = results["mod"], results["dense"]
    ex = ctx.cached("demo_extras", lambda: extras(ctx, results))
    h = ex["heatmap"]
    plots.routing_heatmap({f"{m} ({'causal' if m != 'topk' else 'training forward'})":
                           h["masks"][m] for m in ("topk", "predictor")}, h["chars"], h["layers"],
                          ctx.figure("routing_heatmap"),
                          title="MoD routing on held-out text (dark: processed by the block)")
    diff = mod.headline_loss - dense.headline_loss
    times = ctx.cached("step_times", lambda: interleaved_step_times(results, STEP_REPEATS))
    step_ratio = times["mod"] / times["dense"]
    logged_ratio = (mod.median_step_s / dense.median_step_s
                    if mod.median_step_s and dense.median_step_s else float("nan"))
    head = markdown_table(
        ["", "dense", "MoD", "MoD - dense"],
        [["held-out loss, causal (nats/byte)", fmt(dense.headline_loss),
          f"{fmt(mod.headline_loss)} (predictor)", f"{diff:+.4f}"],
         ["held-out loss, MoD router mode", "", fmt(mod.loss("router")),
          f"{mod.loss('router') - dense.headline_loss:+.4f}"],
         ["held-out loss, MoD top-k (not causal)", "", fmt(mod.loss("topk")),
          f"{mod.loss('topk') - dense.headline_loss:+.4f}"],
         ["pydoc loss, causal", fmt(dense.loss(split="pydoc")),
          fmt(mod.loss(split="pydoc")),
          f"{mod.loss(split='pydoc') - dense.loss(split='pydoc'):+.4f}"],
         ["training steps in the budget", dense.steps, mod.steps, ""],
         [f"step time (median of {STEP_REPEATS}, interleaved)", ms(times["dense"]),
          ms(times["mod"]), f"ratio {step_ratio:.3f}"],
         ["step time logged while training", ms(dense.median_step_s), ms(mod.median_step_s),
          f"ratio {logged_ratio:.3f}"],
         ["training FLOPs per step, ratio", "", "",
          f"{mod.training_flops / dense.training_flops:.3f}"],
         ["training wall time (s)", f"{dense.train_wall_s:.0f}", f"{mod.train_wall_s:.0f}", ""]],
        "lrrr")
    samples = []
    for name in ("dense", "mod"):
        samples += [f"**{name}**" + (" (predictor routing)" if name == "mod" else ""), "", "```"]
        samples += ["\n---\n".join(ex["samples"][name]), "```", ""]
    text = "\n".join([
        f"Both models trained for {mod.train_flops:.3g} (MoD) and {dense.train_flops:.3g} "
        f"(dense) training FLOPs; evaluated on {ctx.windows} windows of 256 bytes of the "
        "held-out plays. Step times: both models built fresh after training and timed one "
        "training step at a time, alternating, in one process (the logged times come from each "
        "run's own training log and are only comparable when the machine was equally loaded "
        "for both).", "", head, "", results_table([dense, mod]), "",
        "![routing heatmap](figures/routing_heatmap.png)", "",
        f"## Samples (temperature 0.8, top-p 0.95, seed 0, {NEW_TOKENS} bytes)", ""] + samples)
    summary = {"loss_diff_causal": diff, "step_time_ratio": step_ratio,
               "step_time_ratio_logged": logged_ratio, "step_s": times,
               "mod": {"steps": mod.steps, "eval": mod.eval["val"]},
               "dense": {"steps": dense.steps, "eval": dense.eval["val"]},
               "samples": ex["samples"]}
    return Report(text, summary)


EXPERIMENT = Experiment(
    name="demo",
    title="modlm demo: Mixture-of-Depths vs its isoFLOP dense baseline",
    description=__doc__.split("\n", 1)[1].strip(),
    stages=(stage,),
    report=report,
    extra_minutes=1.0,
)
