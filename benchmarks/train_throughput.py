"""Training throughput (tokens/s) of dense vs MoD, in float32 and bfloat16 autocast.

A full optimizer step (forward, backward, clip, AdamW) of the `small` preset shape by default
(d_model 256, 6 layers, T 256, byte vocabulary) for the dense model and the same-shape MoD model
(capacity 0.125, every other block), all four variants interleaved in one process, medians.

    python benchmarks/train_throughput.py --json benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from modlm.model import MoDLM
from modlm.optim import build_optimizer
from modlm.presets import dense, get_preset
from modlm.runtime import autocast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    mod_cfg = get_preset(args.preset)
    T = mod_cfg.max_seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mod_cfg.vocab_size, (args.batch, T + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    device = torch.device("cpu")
    variants = {}
    for family, cfg in (("dense", dense(mod_cfg)), ("mod", mod_cfg)):
        for dtype in ("float32", "bfloat16"):  # every variant starts from the same weights
            torch.manual_seed(0)
            model = MoDLM(cfg)
            opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
            variants[(family, dtype)] = (model, opt)

    def step(model: MoDLM, opt: torch.optim.Optimizer, dtype: str) -> float:
        t0 = time.perf_counter()
        with autocast(device, dtype):
            out = model(x, y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for (_, dtype), (m, o) in variants.items():
            step(m, o, dtype)
    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(args.repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            times[k].append(step(*variants[k], k[1]))

    tok_s = {f"{f}/{d}": args.batch * T / statistics.median(t) for (f, d), t in times.items()}
    print(f"preset {args.preset}: d_model {mod_cfg.d_model}, {mod_cfg.n_layers} layers, T {T}, "
          f"batch {args.batch}, {args.threads} threads; optimizer steps, median of {args.repeats}")
    print(f"{'':10s} {'float32 tok/s':>14s} {'bfloat16 tok/s':>15s} {'bf16 speed-up':>14s}")
    for f in ("dense", "mod"):
        a, b = tok_s[f"{f}/float32"], tok_s[f"{f}/bfloat16"]
        print(f"{f:10s} {a:14,.0f} {b:15,.0f} {b / a:14.2f}")
    for d in ("float32", "bfloat16"):
        print(f"MoD / dense throughput, {d}: {tok_s[f'mod/{d}'] / tok_s[f'dense/{d}']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tokens_per_s": tok_s, "batch": args.batch, "seq_len": T,
                       "preset": args.preset, "threads": args.threads,
                       "step_s": {f"{f}/{d}": v for (f, d), v in times.items()},
                       "torch": torch.__version__, "python": platform.python_version(),
                       "date": time.strftime("%Y-%m-%d")}, fh, indent=2)


if __name__ == "__main__":
    main()
