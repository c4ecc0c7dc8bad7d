"""Training-step speed of a dense model against the same-shape MoD model, side by side.

Times forward + backward of both models interleaved in one process (alternating which goes
first), takes medians, and prints the measured time ratio beside the FLOP ratio from
`modlm.flops`, the achieved GFLOP/s of each against a plain matmul measured in the same run, and
the peak memory of each (measured in a fresh child process per model, since a process's
high-water mark cannot be reset).

    python benchmarks/train_step.py                  # d 512, 8 layers, T 1024, batch 4
    python benchmarks/train_step.py --json out.json  # also write the numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from modlm import flops
from modlm.config import ModelConfig, RoutingConfig
from modlm.measure import peak_rss_mib, train_step_seconds
from modlm.model import MoDLM
from modlm.presets import dense


def configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    mod = ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, max_seq_len=args.seq_len,
                      routing=RoutingConfig(capacity=args.capacity))
    return {"dense": dense(mod), "mod": mod}


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def step(model: MoDLM, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward (no optimizer step), as this benchmark has always measured."""
    return train_step_seconds(model, x, y)


def matmul_gflops(args: argparse.Namespace, repeats: int) -> float:
    """A plain (B*T, D) x (D, F) matmul: the MLP's up-projection shape, the step's largest."""
    cfg = configs(args)["dense"]
    a = torch.randn(args.batch * args.seq_len, cfg.d_model)
    b = torch.randn(cfg.d_model, cfg.mlp_hidden)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / statistics.median(times) / 1e9


def memory_child(args: argparse.Namespace, name: str) -> None:
    """Run in a fresh process: peak resident memory of training steps of one model."""
    torch.manual_seed(0)
    model = MoDLM(configs(args)[name])
    x, y = batch(args)
    before = peak_rss_mib()
    for _ in range(2):
        step(model, x, y)
    after = peak_rss_mib()
    print(json.dumps({"peak_rss_mib": after, "step_increase_mib": after - before}))


def peak_memory(args: argparse.Namespace, name: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", name, "--d-model", str(args.d_model),
           "--layers", str(args.layers), "--heads", str(args.heads), "--seq-len",
           str(args.seq_len), "--batch", str(args.batch), "--capacity", str(args.capacity),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile both models first")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args, args.memory_child)
        return

    cfgs = configs(args)
    torch.manual_seed(0)
    models = {name: MoDLM(c) for name, c in cfgs.items()}
    if args.compile:
        models = {name: torch.compile(m) for name, m in models.items()}
    x, y = batch(args)
    for _ in range(args.warmup):
        for m in models.values():
            step(m, x, y)
    times: dict[str, list[float]] = {name: [] for name in models}
    mm_before = matmul_gflops(args, 5)
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(step(models[name], x, y))
    mm_after = matmul_gflops(args, 5)

    train_flops = {n: flops.training_flops(c, args.seq_len) * args.batch for n, c in cfgs.items()}
    med = {n: statistics.median(t) for n, t in times.items()}
    gflops = {n: train_flops[n] / med[n] / 1e9 for n in models}
    mem = {n: peak_memory(args, n) for n in models}
    result = {
        "shape": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                  "seq_len": args.seq_len, "batch": args.batch, "capacity": args.capacity,
                  "vocab": 256, "dtype": "float32", "threads": args.threads,
                  "compiled": args.compile},
        "median_step_s": med,
        "all_step_s": times,
        "time_ratio": med["mod"] / med["dense"],
        "flop_ratio": train_flops["mod"] / train_flops["dense"],
        "achieved_gflops": gflops,
        "matmul_gflops": (mm_before + mm_after) / 2,
        "peak_memory": mem,
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"shape: d_model {args.d_model}, {args.layers} layers, T {args.seq_len}, batch "
          f"{args.batch}, capacity {args.capacity}, float32, {args.threads} threads; "
          f"median of {args.repeats} interleaved steps")
    print(f"{'':8s} {'step ms':>9s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} {'peak RSS MiB':>13s} "
          f"{'step +MiB':>10s}"
          + ("   (torch.compile; memory measured eager)" if args.compile else ""))
    for n in models:
        print(f"{n:8s} {med[n] * 1e3:9.1f} {train_flops[n] / 1e9:11.1f} {gflops[n]:8.1f} "
              f"{mem[n]['peak_rss_mib']:13.0f} {mem[n]['step_increase_mib']:10.0f}")
    print(f"plain matmul ({args.batch * args.seq_len} x {cfgs['dense'].d_model} x "
          f"{cfgs['dense'].mlp_hidden}): {result['matmul_gflops']:.1f} GFLOP/s "
          f"(before {mm_before:.1f}, after {mm_after:.1f}); dense step at "
          f"{gflops['dense'] / result['matmul_gflops']:.0%} of it")
    print(f"time ratio MoD/dense {result['time_ratio']:.3f}   FLOP ratio "
          f"{result['flop_ratio']:.3f}   target: time ratio <= FLOP ratio + 0.02 -> "
          f"{'met' if result['time_ratio'] <= result['flop_ratio'] + 0.02 else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
