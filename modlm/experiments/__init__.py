"""The paper's experiments at CPU scale, one module each (run them with `modlm experiment NAME`).

- demo:     the main job: a MoD model and its isoFLOP dense baseline, causal evaluation, samples,
            a routing heatmap (about 10 minutes on 2 cores).
- isoflop:  paper Fig 3 and 4: dense and MoD models of several sizes at three FLOP budgets.
- controls: paper Sec 4.1 / Fig 3: learned vs random routing, every other vs every block,
            capacities, the auxiliary loss on vs off, at one budget.
- causal:   paper Sec 3.5 / Fig 6: predictor and router accuracy over training, the loss gap
            between top-k and the causal modes.
- routing:  paper Fig 1 and 5: routing heatmap with the text, router-weight histograms, blocks
            used against prediction entropy.
- speed:    training step, prefill, decode, peak memory and KV cache, dense vs MoD, beside the
            FLOP-predicted ratios.
- mode:     paper Sec 4.3 / Fig 7: dense, MoD, MoE, staged and integrated MoDE and the
            reduced-capacity MoE foil at one budget.
- retrofit: a pretrained model (SmolLM2-135M) retrofitted and router-tuned: held-out loss
            against measured decode speed-up, learned routing beside the random control.
- routers:  routers beyond the paper's (threshold, A-MoD, decoupled keys/values, Eq. 1's raw
            weights) against learned and random routing, at two shapes, seeds for the leaders.

What they share (imported by them, never by the model):

- spec.py:     what an experiment is: `RunSpec`, `RunResult`, `Options`, `Experiment`, `Report`.
- runner.py:   `Context` (what stages and reports use) and the resumable runner, which trains
               through `modlm.train` and writes the record folder.
- plan.py:     `--plan` (every run with its steps, FLOPs and a measured step time) and
               interleaved step timing of trained runs' models.
- tables.py:   markdown tables and number formatting.
- analysis.py: routing analysis (paper Fig 1 and 5): blocks used per token, prediction entropy.
- plots.py:    the figures (optional matplotlib).
- sizes.py:    the model sizes the experiments train (dense ladder, isoFLOP MoD twins).

Each experiment module defines `EXPERIMENT` (a `spec.Experiment`); modules are imported only
when asked for. Adding an experiment: a module here whose stages return `ctx.spec(...)` runs (any
ModelConfig or preset, training overrides, seed, family) and whose report builds tables
(`tables.results_table`, `markdown_table`) and figures (`plots`, e.g. `scatter_families` for loss
against forward FLOPs), plus its name in NAMES.
"""

from __future__ import annotations

import importlib

from modlm.config import ConfigError

NAMES = ("demo", "isoflop", "controls", "causal", "routing", "speed", "mode", "retrofit",
         "routers")


def get(name: str):
    """The experiment called `name` (a `modlm.experiments.spec.Experiment`)."""
    if name not in NAMES:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"modlm.experiments.{name}").EXPERIMENT
