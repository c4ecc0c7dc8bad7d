"""Dense decode tokens/s of the eager engine in two checkouts of modlm, side by side: did a change
to the decode path make dense decoding slower?

Each checkout runs in its own process (so each imports its own modlm), the processes alternate
`--rounds` times, and the median per setting is printed: d_model 256 and 512, 8 layers, head
width 64, random weights and prompts of 512 tokens, 128 new tokens sampled at temperature 1,
batch 1 and 8, 2 threads. It uses only the engine's long-standing API (`ModelConfig`, `MoDLM`,
`presets.dense`, `Engine.generate`), so an older checkout runs it too.

    python benchmarks/dense_decode_ab.py /path/to/old/checkout .
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, statistics
sys.path.insert(0, sys.argv[1])
import torch
import modlm
assert modlm.__file__.startswith(sys.argv[1]), modlm.__file__
from modlm.config import ModelConfig
from modlm.generate import Engine
from modlm.model import MoDLM
from modlm.presets import dense
torch.set_num_threads(2)
out = {}
for d in (256, 512):
    for B in (1, 8):
        cfg = ModelConfig(vocab_size=256, d_model=d, n_layers=8, n_heads=d // 64,
                          max_seq_len=1024)
        torch.manual_seed(0)
        engine = Engine(MoDLM(dense(cfg)).eval())
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, 256, (B, 512), generator=g).tolist()
        speeds = [engine.generate(prompts, 128, temperature=1.0, seed=r).decode_tokens_per_s
                  for r in range(4)][1:]
        out[f"d{d} batch {B}"] = statistics.median(speeds)
print(json.dumps(out))
"""


def main() -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write the medians and every round here")
    args = p.parse_args()
    args.before, args.after = os.path.abspath(args.before), os.path.abspath(args.after)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            done = subprocess.run([sys.executable, "-c", CHILD, getattr(args, name)],
                                  capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {}
    for key in runs["before"][0]:
        b = statistics.median(x[key] for x in runs["before"])
        a = statistics.median(x[key] for x in runs["after"])
        medians[key] = {"before": b, "after": a, "after_over_before": a / b}
        print(f"{key}: dense decode tokens/s before {b:.1f}, after {a:.1f} (after / before "
              f"{a / b:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": medians, "rounds": runs, "before": args.before,
                       "after": args.after, "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
