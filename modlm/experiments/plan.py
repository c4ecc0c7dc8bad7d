"""Planning an experiment (`modlm experiment NAME --plan`) and timing training steps.

`plan_experiment` lists every run an experiment would make, with its steps and training FLOPs
(modlm.flops) and a step time measured on this machine; `interleaved_step_times` times trained
runs' models against each other in one process (modlm.measure), for ratios that hold when the
machine's load changed between the runs.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modlm import flops as flop_count
from modlm.config import ModelConfig, TrainConfig
from modlm.experiments.runner import Context
from modlm.experiments.spec import Experiment, Options, RunResult, RunSpec
from modlm.experiments.tables import markdown_table


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    steps: int
    train_flops: float
    step_s: float | None

    @property
    def seconds(self) -> float | None:
        return None if self.step_s is None else self.steps * self.step_s

def plan_experiment(experiment: Experiment, options: Options, measure: bool = True,
                    timing_steps: int = 3) -> list[PlannedRun]:
    """Every run the experiment would make (later stages as the experiment assumes them), with
    steps and training FLOPs from modlm.flops and, with `measure`, the time per step measured
    on this machine (`timing_steps` full optimizer steps per distinct model and batch shape after
    one warm-up step; random token ids)."""
    from modlm.train import total_steps
    ctx = Context(experiment, options)
    specs = [s for stage in experiment.stages for s in stage(ctx, None)]
    step_times: dict[str, float] = {}
    out = []
    for s in specs:
        n = total_steps(s.train, 1)
        seqs = s.train.batch_size * s.train.grad_accum
        model = s.model
        tf = n * seqs * flop_count.training_flops(model, s.train.data.seq_len)
        # What a retrofit run trains (routing alone, or every weight) changes a step's time.
        key = json.dumps([model.to_dict(), s.train.batch_size, s.train.grad_accum,
                          s.train.data.seq_len, s.train.retrofit.train], sort_keys=True)
        if measure and key not in step_times:
            step_times[key] = _time_steps(s.train, timing_steps)
        out.append(PlannedRun(s, n, tf, step_times.get(key)))
    return out

def _step_fn(model_cfg: ModelConfig, batch: int, seq_len: int, lr: float = 1e-4,
             weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
             eps: float = 1e-8, build: Callable[[], Any] | None = None) -> Callable[[], float]:
    """A fresh model (`build()`, default a MoDLM of model_cfg) and optimizer on fixed random
    tokens; the function times one training step (forward, backward, clip, AdamW;
    modlm.measure.train_step_seconds). Threshold routers are set to route their capacity, as
    trained ones do (`measure.thresholds_at_capacity`)."""
    import torch

    from modlm.measure import thresholds_at_capacity, train_step_seconds
    from modlm.model import MoDLM
    from modlm.optim import build_optimizer
    torch.manual_seed(0)
    model = build() if build is not None else MoDLM(model_cfg)
    opt = build_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (batch, seq_len + 1), generator=g)
    thresholds_at_capacity(model, ids[:, :-1])
    return lambda: train_step_seconds(model, ids[:, :-1], ids[:, 1:], opt)

def _time_steps(cfg: TrainConfig, n: int) -> float:
    model_cfg, build = cfg.model, None
    if cfg.retrofit.enabled:
        from modlm.hf.retrofit import planned_model
        model_cfg, build = planned_model(cfg)
    step = _step_fn(model_cfg, cfg.batch_size, cfg.data.seq_len, lr=cfg.lr,
                    weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps, build=build)
    times = [step() * cfg.grad_accum for _ in range(n + 1)]
    return statistics.median(times[1:])

def interleaved_step_times(runs: Mapping[str, RunResult], repeats: int) -> dict[str, float]:
    """Median training-step time (seconds) of each run's model, all built fresh in this process
    and timed interleaved (modlm.measure.interleaved) at the runs' batch shape (batch_size
    counts every sequence of an optimizer step). Unlike a run's logged `median_step_s`, these
    ratios hold when the runs trained on a machine whose load changed between them."""
    from modlm import measure
    fns = {name: _step_fn(r.model_config, r.batch_size, r.seq_len) for name, r in runs.items()}
    return measure.medians(measure.interleaved(fns, repeats=repeats))


def plan_table(plan: Sequence[PlannedRun]) -> str:
    rows = []
    for p in plan:
        rows.append([p.spec.name, p.spec.family, f"{flop_count.param_count(p.spec.model).total:,d}",
                     p.steps, f"{p.train_flops:.3g}",
                     "-" if p.step_s is None else f"{p.step_s * 1e3:.0f}",
                     "-" if p.seconds is None else f"{p.seconds / 60:.1f}"])
    return markdown_table(["run", "family", "params", "steps", "train FLOPs", "step ms",
                           "minutes"], rows, "llrrrrr")
