"""MoDE at one FLOP budget (paper Sec 4.3, Fig 7): dense, MoD, MoE, staged MoDE, integrated MoDE
and the reduced-capacity MoE foil, each trained for the same training FLOPs on the built-in corpus.

Every model is a preset of `modlm.presets` on one base shape (the MoE variants use 4 top-1
experts of the dense MLP's width in every block; see that module). Each trains through
`modlm.train` for `--budget` training FLOPs (so cheaper models take more steps), then the script
reports the held-out loss in the training forward (`topk`: MoD top-k, MoE capacity applied: the
paper's objective in Fig 7) and in the inference forward (causal MoD routing via the predictor
or router, no expert capacity), the forward FLOPs per sequence relative to dense, the MoE
layers' computed / dropped / no-op shares, and a training-step time measured for all models
interleaved in one process after training (median of `--repeats`).

    python benchmarks/mode.py                              # base `small`, 2e13 FLOPs
    python benchmarks/mode.py --base tiny --budget 2e11    # a smoke run in about a minute

Rerunning skips finished models and resumes an interrupted one from its checkpoint. Writes
`<out>/mode.json`, `<out>/mode.md` (the table) and `<out>/mode.png` (loss against forward FLOPs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from modlm import flops
from modlm.model import MoDLM
from modlm.presets import get_preset
from modlm.train import configure, train

VARIANTS = {  # label -> preset suffix
    "dense": "-dense", "MoD": "", "MoE": "-moe", "staged MoDE": "-mode-staged",
    "integrated MoDE": "-mode-integrated", "reduced-capacity MoE": "-moe-reduced"}


def causal_mode(modes: dict) -> str:
    return "predictor" if "predictor" in modes else ("router" if "router" in modes else "topk")


def run_one(label: str, preset: str, args: argparse.Namespace) -> dict:
    out = Path(args.out)
    name = preset
    summary_path = out / "runs" / name / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    cfg = configure(preset, {
        "flops": args.budget, "seed": args.seed, "batch_size": args.batch,
        "eval_every": 10**9, "eval_batches": args.eval_batches, "checkpoint_every": 100,
        "log_every": 10, "out_dir": str(out / "runs"), "run_name": name, "device": "cpu"})
    run_dir = out / "runs" / name
    t0 = time.perf_counter()
    result = train(cfg, resume=run_dir if (run_dir / "config.json").exists() else None)
    if result.interrupted:
        sys.exit(f"interrupted during {name}; rerun the same command to continue")
    val = result.final_eval["val"]
    mode = causal_mode(val)
    summary = {
        "label": label, "preset": preset, "steps": result.total_steps,
        "train_wall_s": time.perf_counter() - t0,
        "params": flops.param_count(cfg.model).total,
        "forward_flops": flops.forward_flops(cfg.model, cfg.data.seq_len).total,
        "train_flops": flops.training_flops(cfg.model, cfg.data.seq_len) * cfg.batch_size
        * result.total_steps,
        "loss_topk": val["topk"]["loss"], "causal_mode": mode, "loss_causal": val[mode]["loss"],
        "pydoc_loss_topk": result.final_eval["pydoc"]["topk"]["loss"],
        "moe_topk": val["topk"].get("moe", []), "moe_causal": val[mode].get("moe", []),
        "run_dir": str(run_dir)}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def step_times(presets: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """Median forward+backward time per model, all models interleaved in this process."""
    models = {label: MoDLM(get_preset(p)) for label, p in presets.items()}
    T = models["dense"].cfg.max_seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (args.batch, T + 1), generator=g)
    times: dict[str, list[float]] = {label: [] for label in models}
    for r in range(args.repeats + 1):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for label in order:
            t0 = time.perf_counter()
            models[label](ids[:, :-1], ids[:, 1:]).loss.backward()
            elapsed = time.perf_counter() - t0
            models[label].zero_grad(set_to_none=True)
            if r > 0:  # the first round warms up allocators and kernels
                times[label].append(elapsed)
    return {label: statistics.median(t) for label, t in times.items()}


def table(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["label"] == "dense")
    lines = ["| model | params | steps | fwd FLOPs / dense | step time / dense | held-out loss "
             "(training fwd) | held-out loss (inference fwd) | MLP slots computed / dropped / "
             "no-op |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        moe = r["moe_topk"]
        shares = ("" if not moe else " / ".join(
            f"{statistics.mean(m[k] for m in moe):.2f}" for k in ("computed", "dropped", "noop")))
        lines.append(
            f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
            f"{r['forward_flops'] / dense['forward_flops']:.3f} | "
            f"{r['step_s'] / dense['step_s']:.3f} | {r['loss_topk']:.4f} | "
            f"{r['loss_causal']:.4f} ({r['causal_mode']}) | {shares} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dense = next(r for r in rows if r["label"] == "dense")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        x = r["forward_flops"] / dense["forward_flops"]
        ax.scatter(x, r["loss_topk"], s=40)
        ax.annotate(r["label"], (x, r["loss_topk"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("forward FLOPs per sequence / dense")
    ax.set_ylabel("held-out loss (nats/byte, training forward)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="small", choices=["tiny", "small"])
    p.add_argument("--budget", type=float, default=2e13, help="training FLOPs per model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=8, help="timed steps per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/mode-benchmark")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    presets = {label: args.base + suffix for label, suffix in VARIANTS.items()}
    rows = [run_one(label, preset, args) for label, preset in presets.items()]
    for row, t in zip(rows, step_times(presets, args).values()):
        row["step_s"] = t
    title = (f"MoDE at {args.budget:.2g} training FLOPs, base `{args.base}`, "
             f"batch {args.batch}, seed {args.seed}")
    out = Path(args.out)
    md = f"{title}\n\n{table(rows)}\n"
    (out / "mode.md").write_text(md)
    (out / "mode.json").write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "args": vars(args), "rows": rows}, indent=2))
    figure(rows, out / "mode.png", title)
    print(md)
    print(f"wrote {out / 'mode.md'}, {out / 'mode.json'}, {out / 'mode.png'}")


if __name__ == "__main__":
    main()
