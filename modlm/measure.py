"""Speed and memory measurement: training steps, prefill, decode, peak memory.

Legend: B batch, T time.

Timing rules shared by the experiments (and the benchmark scripts' conventions):
- models compared are timed in one process, interleaved (the order alternates every round), after
  warm-up rounds, and summarised by the median, so a machine that slows down for a while
  slows every model alike;
- a training step is what the training loop does: forward, backward, gradient clipping and an
  AdamW step (`train_step_seconds`);
- peak memory is the resident-set high-water mark of a fresh child process that builds one model
  and runs training steps (a process's high-water mark cannot be reset), minus the mark before
  the steps: the memory the steps add (Linux only).
Nothing here computes FLOPs; predicted ratios come from modlm.flops.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from modlm.config import ModelConfig
from modlm.router import LinearRouter


def train_step_seconds(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor,
                       optimizer: torch.optim.Optimizer | None = None) -> float:
    """Wall time of one training step (forward, backward, clip, optimizer step if given)."""
    t0 = time.perf_counter()
    model(x_BT, y_BT).loss.backward()
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def thresholds_at_capacity(model: torch.nn.Module, idx_BT: torch.Tensor) -> None:
    """Set every threshold router's bias so that it routes its block's capacity of `idx_BT`'s
    tokens, block by block in order (each block's input depends on the ones before). A trained
    threshold router's penalty holds its share there; a fresh one routes about half the tokens,
    so timing it fresh would time a different computation."""
    from modlm.block import RoutedLayer
    from modlm.router import ThresholdRouter
    for layer in (m for m in model.modules() if isinstance(m, RoutedLayer)):
        if not isinstance(layer.router, ThresholdRouter):
            continue
        seen: list[torch.Tensor] = []
        hook = layer.router.register_forward_hook(
            lambda mod, args, out, seen=seen: seen.append(out))
        try:
            model(idx_BT)
        finally:
            hook.remove()
        layer.router.bias -= torch.quantile(seen[0].flatten().float(), 1.0 - layer.capacity)


def interleaved(fns: Mapping[str, Callable[[], float]], repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Call each measurement `warmup + repeats` times, alternating the order every round; return
    the measured values of the last `repeats` rounds per name."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            value = fns[name]()
            if r >= warmup:
                out[name].append(value)
    return out


def medians(samples: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(v) for name, v in samples.items()}


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark in MiB (VmHWM: it belongs to this process
    image; getrusage's ru_maxrss would carry a parent's mark across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def step_memory_child(cfg_json: str, batch: int, seq_len: int, steps: int = 2) -> dict[str, float]:
    """Run in a fresh process: build the model, run training steps, report peak memory."""
    from modlm.model import MoDLM
    from modlm.optim import build_optimizer
    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    torch.manual_seed(0)
    model = MoDLM(cfg)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    before = peak_rss_mib()
    for _ in range(steps):
        train_step_seconds(model, ids[:, :-1], ids[:, 1:], opt)
    after = peak_rss_mib()
    return {"peak_rss_mib": after, "step_increase_mib": after - before}


def step_memory(cfg: ModelConfig, batch: int, seq_len: int, threads: int | None = None
                ) -> dict[str, float]:
    """Peak memory of training steps of `cfg`, measured in a fresh child process."""
    code = ("import json, sys, torch\n"
            + (f"torch.set_num_threads({int(threads)})\n" if threads else "")
            + "from modlm.measure import step_memory_child\n"
            f"print(json.dumps(step_memory_child(sys.argv[1], {int(batch)}, {int(seq_len)})))\n")
    done = subprocess.run([sys.executable, "-c", code, cfg.to_json()], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the memory-measuring child process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prefill_seconds(engine: Any, prompts: list[list[int]]) -> float:
    """Wall time of one batched prefill (`generate.Engine.prefill`)."""
    t0 = time.perf_counter()
    engine.prefill(prompts)
    return time.perf_counter() - t0


def hf_decode_tokens_per_s(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int,
                           sample: bool) -> float:
    """Decode tokens/s of Hugging Face `generate` with its own KV cache, prefill excluded:
    (time(n new) - time(1 new)) / (n - 1) steps; sampling at temperature 1 or greedy."""
    ids = torch.tensor(prompts)

    def seconds(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=sample, pad_token_id=0,
                           **({"temperature": 1.0, "top_k": 0} if sample else {}))
        return time.perf_counter() - t0

    full, one = seconds(new_tokens), seconds(1)
    # Too few tokens for the machine's noise: no number rather than a negative one.
    return len(prompts) * (new_tokens - 1) / (full - one) if full > one else math.nan


class RateRouter(LinearRouter):
    """A router whose causal decisions route each token with probability `rate`, whatever its
    content: for timing sampling at a controlled routed fraction without training a model (an
    untrained router routes arbitrarily, and a briefly trained one drifts with the text).

    It does a learned router's work per token (the same r = w^T x) and then replaces the logits
    by draws of N(0, 1), taken in turn from a table drawn once from `seed` (2^16 of them, reused
    in a cycle), so a token routes when its draw passes the (1 - rate) quantile; the routed
    update is weighted by sigmoid of that draw, as a trained router's would be by its logit.
    Rows and steps route independently. The table and its cursor are buffers, so a compiled
    decode step draws the same values as the eager one.
    """

    TABLE = 1 << 16

    def __init__(self, weight: torch.nn.Parameter, rate: float, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"a routing rate is a fraction in [0, 1], got {rate}")
        super().__init__(weight.shape[0])
        self.weight = weight
        self.rate = rate
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(self.TABLE, generator=g)
        # The table twice over, so a run of draws that wraps around is one slice.
        self.register_buffer("draws", torch.cat((table, table)).to(weight.device),
                             persistent=False)
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long, device=weight.device),
                             persistent=False)
        self.threshold = (math.inf if rate == 0.0 else -math.inf if rate == 1.0 else
                          statistics.NormalDist().inv_cdf(1.0 - rate))

    def causal_threshold(self, capacity: float) -> float:
        return self.threshold

    def rewind(self) -> None:
        """Start the draws again from the first: the next generation routes as the first did."""
        self.cursor.zero_()

    def forward(self, x_BTD: torch.Tensor, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        logits_BT = super().forward(x_BTD, generator)
        n = logits_BT.numel()
        if n > self.TABLE:
            raise ValueError(f"a RateRouter draws at most {self.TABLE} values per call, "
                             f"got {n} tokens")
        if torch.compiler.is_compiling():
            # In a graph the start is a tensor (a Python int would be baked into the graph).
            start = self.cursor % self.TABLE
            draws = self.draws[start + torch.arange(n, device=logits_BT.device)]
        else:
            start = int(self.cursor) % self.TABLE     # a slice costs less than a gather
            draws = self.draws[start:start + n]
        self.cursor.add_(n)
        return draws.view(logits_BT.shape)


def route_at_rate(model: torch.nn.Module, rate: float, seed: int = 0) -> list[RateRouter]:
    """Give every learned router of `model` (a MoDLM or a retrofitted model) a `RateRouter` with
    its weights, so sampling in mode "router" routes `rate` of the tokens of each routed block;
    return them (`RateRouter.rewind` replays their draws)."""
    from modlm.block import RoutedLayer
    layers = [m for m in model.modules() if isinstance(m, RoutedLayer)]
    if not layers or not all(isinstance(m.router, LinearRouter) for m in layers):
        raise ValueError("route_at_rate needs a model whose routed blocks have learned routers")
    for i, layer in enumerate(layers):
        layer.router = RateRouter(layer.router.weight, rate, seed=seed * 1000 + i)
    return [layer.router for layer in layers]
