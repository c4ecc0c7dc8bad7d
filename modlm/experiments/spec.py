"""What an experiment is: named training runs (`RunSpec`), what each is worth once trained
(`RunResult`), how to run them (`Options`), and the experiment itself (`Experiment`: stages of
runs, then a report).

A stage is a function that returns `RunSpec`s (a name, a complete `TrainConfig`, a family label
for tables and figures, free-form tags); it sees the results of earlier stages, so a later stage
can, for example, rerun the best model of the first with more seeds. The runner (runner.py)
trains each spec, evaluates it and stores its `RunResult`; the report turns the results into
tables (tables.py), figures (plots.py) and a summary. Adding an experiment is listing its specs
and choosing its outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modlm.config import ConfigError, ModelConfig, TrainConfig

if TYPE_CHECKING:
    from modlm.experiments.runner import Context

EVAL_BATCH = 16            # windows per evaluation batch
DEFAULT_EVAL_WINDOWS = 256  # held-out windows every final evaluation uses (65,536 tokens at T 256)
MIN_STEPS = 4              # a budget shrunk by --budget-scale still trains this many steps


# ---- specs and results -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment.

    name: unique within the experiment (the run's folder name). train: the complete training
    config (the runner sets out_dir and run_name). family: what tables and figures group by
    ("dense", "mod", ...). tags: JSON values describing the run (budget, seed, variant, ...).
    keep_checkpoint: keep the final weights after evaluation (for analyses that load the model);
    otherwise the checkpoints are deleted once the result is stored.
    """

    name: str
    train: TrainConfig
    family: str = ""
    tags: Mapping[str, Any] = field(default_factory=dict)
    keep_checkpoint: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"run name {self.name!r} must be a plain folder name")

    @property
    def model(self) -> ModelConfig:
        """The model the run trains: a retrofit run's shape comes from its source's config."""
        if self.train.retrofit.enabled:
            from modlm.hf.retrofit import planned_model
            return planned_model(self.train)[0]
        return self.train.model

    @property
    def seed(self) -> int:
        return self.train.seed

    def config_hash(self) -> str:
        """Identifies the run's configuration (not where it is written)."""
        return config_hash(self.train.to_dict())


def config_hash(train_dict: Mapping[str, Any]) -> str:
    """Hash of a TrainConfig's dict without out_dir and run_name (where the run is written)."""
    d = {k: v for k, v in train_dict.items() if k not in ("out_dir", "run_name")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_config_hash(run_dir: Path) -> str | None:
    """The hash of the config a run folder records, as this version reads it: a field added to
    the configs since the run was recorded takes its default, which is the behaviour the run had
    (new options default to what the code did before), so a record stays resumable across such
    additions. None when the folder has no config this version can read."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        return config_hash(TrainConfig.from_dict(saved).to_dict())
    except (OSError, ValueError, TypeError, KeyError):   # ConfigError is a ValueError
        return None


@dataclass(frozen=True)
class RunResult:
    """What a finished run is worth to an experiment (stored as results/RUN.json).

    forward_flops / training_flops: per sequence of seq_len tokens (modlm.flops). eval:
    {split: {mode: {"loss", "bpb", "tokens", "layers"}}} on the fixed held-out windows, split
    "val" (held-out text) and "pydoc". headline_mode: the causal mode the experiment reports for
    this model (`headline_mode`). median_step_s: see runner.py's docstring. aux_share: the router's
    weighted auxiliary loss as a fraction of the LM loss, averaged over the last fifth of the
    logged steps (None without a learned router). train_lm_loss: the same average of the
    training LM loss.
    """

    name: str
    family: str
    tags: dict[str, Any]
    seed: int
    config_hash: str
    model: dict[str, Any]
    params: int
    non_embedding_params: int
    seq_len: int
    batch_size: int
    forward_flops: float
    training_flops: float
    steps: int
    tokens: int
    train_flops: float
    budget: float | None
    median_step_s: float | None
    step_time_samples: int
    train_wall_s: float
    eval_wall_s: float
    resumed: bool
    train_lm_loss: float | None
    aux_share: float | None
    eval: dict[str, dict[str, Any]]
    headline_mode: str
    run_dir: str
    checkpoint: str | None

    def loss(self, mode: str | None = None, split: str = "val") -> float:
        """Held-out loss in `mode` (default: the headline causal mode)."""
        return self.eval[split][mode or self.headline_mode]["loss"]

    @property
    def headline_loss(self) -> float:
        return self.loss()

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d))
        if missing:
            raise ConfigError(f"the stored result of run {d.get('name')!r} lacks {missing} "
                              f"(written by another version of modlm); delete it to evaluate "
                              f"the run again")
        return cls(**{k: v for k, v in d.items() if k in names})


def headline_mode(cfg: ModelConfig) -> str:
    """The causal mode an experiment reports, of those `evaluate.available_modes` offers:
    `predictor` when the model has one (paper Sec 4.2 evaluates autoregressively with the
    predictor), else `router` (the aux-loss rule, the random control's causal rule, or a model's
    other inference forward), else `topk` (a dense model, where there is one mode)."""
    from modlm.evaluate import available_modes
    modes = available_modes(cfg)
    return next(m for m in ("predictor", "router", "topk") if m in modes)


# ---- options and the experiment ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """How to run an experiment. budget_scale multiplies every FLOP budget and step count (tests
    and smoke runs use small values; a shrunk budget still trains MIN_STEPS steps). eval_windows:
    held-out windows of the final evaluation (default DEFAULT_EVAL_WINDOWS, shrunk with the
    budget). overrides: dotted TrainConfig overrides applied to every run (e.g. data.corpus)."""

    out: str = "runs/experiments"
    budget_scale: float = 1.0
    eval_windows: int | None = None
    threads: int | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.budget_scale, (int, float)) and 0 < self.budget_scale
                and math.isfinite(self.budget_scale)):
            raise ConfigError(f"--budget-scale must be a positive number, got {self.budget_scale}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise ConfigError(f"--eval-windows must be >= 1, got {self.eval_windows}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")

    @property
    def windows(self) -> int:
        if self.eval_windows is not None:
            return self.eval_windows
        return max(EVAL_BATCH, round(DEFAULT_EVAL_WINDOWS * min(1.0, self.budget_scale)))

    def command(self, name: str) -> str:
        parts = ["modlm", "experiment", name]
        if self.out != Options.out:
            parts += ["--out", self.out]
        if self.budget_scale != 1.0:
            parts += ["--budget-scale", f"{self.budget_scale:g}"]
        if self.eval_windows is not None:
            parts += ["--eval-windows", str(self.eval_windows)]
        if self.threads is not None:
            parts += ["--threads", str(self.threads)]
        for k, v in self.overrides.items():
            parts += ["--set", f"{k}={v}"]
        return shlex.join(parts)


@dataclass(frozen=True)
class Report:
    """What an experiment's report function returns: markdown (figures referenced as
    `figures/NAME.png`) and the numbers behind it."""

    markdown: str
    summary: dict[str, Any]


Stage = Callable[["Context", "dict[str, RunResult] | None"], list[RunSpec]]


@dataclass(frozen=True)
class Experiment:
    """A named experiment: stages of runs, then a report.

    A stage receives the results so far, or None when the runner only plans (`--plan`): it must
    then return representative specs (e.g. assume the middle of a grid is the best) so the plan
    can estimate the time. `extra_minutes`: time the report's measurements take beyond training
    (measured on our machine, for the plan). `figures`: whether the report draws figures (then
    matplotlib is checked before any training starts).
    """

    name: str
    title: str
    description: str
    stages: tuple[Stage, ...]
    report: Callable[[Context, dict[str, RunResult]], Report]
    extra_minutes: float = 0.0
    figures: bool = True
    eval_windows: int | None = None   # this experiment's default held-out windows (see Options)
    # Called after each run (also one finished before): measurements that need the trained
    # weights are taken while they exist and cached (ctx.cached), so the report of a record
    # continued in a fresh clone, without checkpoints, still has them.
    after_run: Callable[[Context, RunResult], None] | None = None
