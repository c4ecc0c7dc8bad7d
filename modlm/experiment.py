"""Experiments: named lists of training runs, a resumable runner, and the record each one writes.

An experiment (see modlm/experiments/) is a few *stages* and a *report*. A stage is a function
that returns `RunSpec`s (a name, a complete `TrainConfig`, a family label for tables and figures,
free-form tags); it sees the results of earlier stages, so a later stage can, for example, rerun
the best model of the first with more seeds. The runner trains each spec through
`modlm.train.train`, evaluates the final weights on a fixed held-out set in every routing mode,
and stores one `RunResult` per run. The report turns the results into tables, figures and a
summary. Adding an experiment is listing its specs and choosing its outputs.

A record folder (`OUT/NAME/`):

    experiment.json    the experiment, its options, the command, every planned spec
    env.json           versions, device, threads, git revision
    runs/RUN/          each training run's folder (config.json, metrics.jsonl, env.json, ...)
    results/RUN.json   each finished run's RunResult: sizes, FLOPs, steps, step time, evaluation
    measurements/      cached non-training measurements (speed, routing analysis, samples)
    figures/*.png      the report's figures
    report.md          tables, figures, the command that reproduces them
    summary.json       the report's numbers
    .gitignore         keeps the checkpoints out of version control

Resuming: running the same command again skips every run whose result exists (after checking
that its configuration is the planned one), continues an interrupted run from its latest
checkpoint, and restarts a run that died before its first checkpoint. Runs are deterministic
given their seeds (model initialisation, data order and routing RNG all come from the spec).

Step time of a run: the median over its logged optimizer steps after the first
`STEP_TIME_SKIP` (the logged `tokens_per_s` of a step is that step's own time, without
evaluation or checkpointing), so time ratios between runs come from the records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modlm import atomic
from modlm import flops as flop_count
from modlm.config import ConfigError, DataConfig, ModelConfig, TrainConfig, apply_overrides

STEP_TIME_SKIP = 10        # optimizer steps left out of the median step time (warm-up)
EVAL_BATCH = 16            # windows per evaluation batch
DEFAULT_EVAL_WINDOWS = 256  # held-out windows every final evaluation uses (65,536 tokens at T 256)
PYDOC_WINDOWS = 64         # windows of the second, out-of-domain evaluation set
MIN_STEPS = 4              # a budget shrunk by --budget-scale still trains this many steps


class ExperimentInterrupted(RuntimeError):
    """A run was interrupted (Ctrl-C / SIGTERM) after saving a checkpoint; rerun to continue."""


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
    this model (`headline_mode`). median_step_s: see the module docstring. aux_share: the router's
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


# ---- options, record, context ------------------------------------------------------------------


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


class Context:
    """What stages and reports use: options, the record folder, budget helpers, data, runs."""

    def __init__(self, experiment: Experiment, options: Options) -> None:
        self.experiment = experiment
        self.options = options
        self.root = Path(options.out) / experiment.name
        self._data: dict[str, Any] = {}

    @property
    def windows(self) -> int:
        """Held-out windows of the final evaluation: --eval-windows, else the experiment's own
        default (shrunk with the budget), else Options' default."""
        if self.options.eval_windows is None and self.experiment.eval_windows is not None:
            return max(EVAL_BATCH // 4, round(self.experiment.eval_windows
                                              * min(1.0, self.options.budget_scale)))
        return self.options.windows

    # -- folders --

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    def figure(self, name: str) -> Path:
        """Where a figure goes (figures/NAME.png); the folder is created."""
        path = self.root / "figures" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- budgets --

    def budget(self, flops: float) -> float:
        """A FLOP budget after --budget-scale."""
        return flops * self.options.budget_scale

    def steps(self, n: int) -> int:
        """A step count after --budget-scale (at least MIN_STEPS)."""
        return max(MIN_STEPS, round(n * self.options.budget_scale))

    # -- building specs --

    def spec(self, name: str, model: ModelConfig | str, *, family: str = "", seed: int = 0,
             flops: float | None = None, steps: int | None = None,
             train: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
             keep_checkpoint: bool = False, evals: int = 1) -> RunSpec:
        """A run of `model` (a ModelConfig or a preset name) for a training-FLOP budget (already
        scaled: pass `ctx.budget(x)`) or a step count (pass `ctx.steps(n)`), with the
        experiments' training defaults, `train` overrides, then the --set overrides.

        Seeds: `seed` sets model initialisation, routing RNG and data order together.
        `evals`: how many times the trainer evaluates during the run (its own, small evaluation,
        logged to metrics.jsonl; the final evaluation on the fixed held-out set comes after).
        """
        from modlm.presets import get_preset
        if (flops is None) == (steps is None):
            raise ConfigError(f"run {name}: give exactly one of flops or steps")
        model_cfg = get_preset(model) if isinstance(model, str) else model
        data = DataConfig(seq_len=min(256, model_cfg.max_seq_len))
        base = TrainConfig(model=model_cfg, data=data, steps=1, batch_size=16, lr=2e-3,
                           warmup_steps=0, eval_batches=1, log_every=5, keep_last=1,
                           seed=seed, device="cpu",
                           preset=model if isinstance(model, str) else "custom")
        cfg = apply_overrides(base, {"data.seed": seed, **(train or {}),
                                     **self.options.overrides})
        cfg = self._resolve_vocab(cfg)
        per_step = cfg.batch_size * cfg.grad_accum * flop_count.training_flops(
            cfg.model, cfg.data.seq_len)
        if flops is not None:
            # Deviation: a budget shrunk below MIN_STEPS steps (smoke runs) trains MIN_STEPS.
            cfg = dataclasses.replace(cfg, steps=None, flops=max(flops, MIN_STEPS * per_step))
            n_steps = math.floor(cfg.flops / per_step)
        else:
            n_steps = steps
            cfg = dataclasses.replace(cfg, steps=steps)
        touched = set(train or {}) | set(self.options.overrides)
        # Warm-up: 5% of the run (at most 50 steps); evaluation and checkpoints at sensible
        # periods, unless the spec says otherwise.
        defaults = {"warmup_steps": min(50, max(1, n_steps // 20)),
                    "eval_every": max(1, n_steps // evals),
                    "checkpoint_every": max(25, n_steps // 4)}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if k not in touched})
        return RunSpec(name, cfg, family, dict(tags or {}), keep_checkpoint)

    def _resolve_vocab(self, cfg: TrainConfig) -> TrainConfig:
        """The tokenizer decides the vocabulary (as `train` does), before FLOPs are counted."""
        vocab = self.data(cfg.data).tokenizer.vocab_size
        if cfg.model.vocab_size == vocab:
            return cfg
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))

    def data(self, data_cfg: DataConfig | None = None, tokenizer: Any = None) -> Any:
        """The prepared data (modlm.data.PreparedData) of a data config (default: the built-in
        corpus with the --set overrides), prepared once per process; `tokenizer` reads it with a
        given tokenizer (a pretrained model's own) instead of the config's."""
        from modlm.data import prepare_data
        if data_cfg is None:
            data_cfg = self.spec_data_config()
        key = json.dumps({**data_cfg.to_dict(), "seed": 0,  # seed: order only
                          "tokenizer": None if tokenizer is None else
                          [tokenizer.name, tokenizer.vocab_size, id(type(tokenizer))]},
                         sort_keys=True)
        if key not in self._data:
            self._data[key] = prepare_data(data_cfg, tokenizer=tokenizer)
        return self._data[key]

    def spec_data_config(self) -> DataConfig:
        data_over = {k.removeprefix("data."): v for k, v in self.options.overrides.items()
                     if k.startswith("data.")}
        return apply_overrides(DataConfig(), data_over)

    # -- running --

    def run(self, spec: RunSpec, index: int = 0, total: int = 0) -> RunResult:
        return run_spec(self, spec, index, total)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """A JSON-able measurement, computed once and kept in measurements/KEY.json."""
        path = self.root / "measurements" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, value)
        return json.loads(path.read_text())

    def load_model(self, result: RunResult) -> Any:
        """The trained model of a run kept with keep_checkpoint (modlm.model.MoDLM, eval mode)."""
        from modlm.checkpoint import load_model
        if result.checkpoint is None:
            raise ConfigError(f"run {result.name} kept no checkpoint; give its spec "
                              f"keep_checkpoint=True")
        path = self.root / result.checkpoint
        if not path.exists():
            raise ConfigError(
                f"run {result.name} is done but its checkpoint {path} is not here (checkpoints "
                f"stay out of git, so a record in a fresh clone has none), and a measurement not "
                f"yet recorded needs it: delete {self.results_dir / (result.name + '.json')} to "
                f"train the run again")
        model, loaded = load_model(path)
        return model, loaded.tokenizer


# ---- the runner --------------------------------------------------------------------------------


def run_spec(ctx: Context, spec: RunSpec, index: int = 0, total: int = 0) -> RunResult:
    """Train (or skip, or continue) one run, evaluate it, store and return its result."""
    from modlm import checkpoint as ckpt
    from modlm.train import total_steps, train
    result_path = ctx.results_dir / f"{spec.name}.json"
    where = f"[{index}/{total}] " if total else ""
    if result_path.exists():
        result = RunResult.from_dict(json.loads(result_path.read_text()))
        if spec.config_hash() not in (result.config_hash,
                                      recorded_config_hash(ctx.runs_dir / spec.name)):
            raise ConfigError(
                f"{result_path} holds a run named {spec.name} with a different configuration "
                f"than this experiment plans (other options or code?); continue it with the "
                f"options it was made with (see {ctx.root / 'experiment.json'}), or use another "
                f"--out")
        print(f"{where}{spec.name}: done before, skipped", flush=True)
        return result

    run_dir = ctx.runs_dir / spec.name
    cfg = dataclasses.replace(spec.train, out_dir=str(ctx.runs_dir), run_name=spec.name)
    resume = None
    if run_dir.exists():
        with _run_lock(run_dir, "train it again"):   # never under a live writer's feet
            if ckpt.latest_checkpoint(run_dir) is None:  # died before its first checkpoint
                _empty_folder(run_dir)
            else:
                if recorded_config_hash(run_dir) != spec.config_hash():
                    raise ConfigError(
                        f"{run_dir} holds an unfinished run with a different configuration "
                        f"than this experiment plans; continue it with the options it was "
                        f"started with, delete that folder to start it again, or use another "
                        f"--out")
                resume = run_dir
    n_steps = total_steps(cfg, 1)
    print(f"{where}{spec.name}: {'continuing' if resume else 'training'} "
          f"{flop_count.param_count(spec.model).total:,d} parameters for {n_steps} steps "
          f"({cfg.batch_size} x {cfg.data.seq_len} tokens each)", flush=True)
    t0 = time.perf_counter()
    out = train(cfg, resume=resume)
    wall = time.perf_counter() - t0
    if out.interrupted:
        raise ExperimentInterrupted(
            f"run {spec.name} was interrupted at step {out.step}/{out.total_steps} (checkpoint "
            f"saved); run the same command again to continue")
    t1 = time.perf_counter()
    result = _evaluate_run(ctx, spec, cfg, run_dir, out.total_steps, wall, resume is not None)
    result = dataclasses.replace(result, eval_wall_s=time.perf_counter() - t1)
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    if not spec.keep_checkpoint:
        with _run_lock(run_dir, "record its result"):
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        result = dataclasses.replace(result, checkpoint=None)
    atomic.write_json(result_path, result.to_dict())
    print(f"{where}{spec.name}: held-out loss {result.headline_loss:.4f} "
          f"({result.headline_mode}); median step {ms(result.median_step_s)}; "
          f"trained in {wall:.0f} s, evaluated in {result.eval_wall_s:.0f} s", flush=True)
    return result


@contextlib.contextmanager
def _run_lock(run_dir: Path, then: str) -> Iterator[None]:
    """The run folder's lock (atomic.FolderLock, the one `train` takes) for the block: the
    runner deletes nothing in a folder another process is writing (another runner of the same
    record training this run, or `modlm train --resume`); such a folder is refused."""
    lock = atomic.FolderLock(run_dir).take(f"nothing was deleted: wait for it to finish (or "
                                           f"stop it), then run the same command again to {then}")
    try:
        yield
    finally:
        lock.release()


def _empty_folder(folder: Path) -> None:
    """Delete what `folder` holds, except its lock (held by the caller while it deletes)."""
    for p in folder.iterdir():
        if p.name == atomic.FolderLock.NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _evaluate_run(ctx: Context, spec: RunSpec, cfg: TrainConfig, run_dir: Path, steps: int,
                  wall: float, resumed: bool) -> RunResult:
    from modlm.checkpoint import latest_checkpoint, load_model
    last = latest_checkpoint(run_dir)
    model, loaded = load_model(last)
    # The model as trained (a retrofit run's shape comes from its Hugging Face config).
    cfg = dataclasses.replace(cfg, model=loaded.model_cfg)
    evals = evaluate_splits(ctx, model, cfg.data, loaded.tokenizer)
    T = cfg.data.seq_len
    step_s, n_samples = median_step_time(run_dir, cfg)
    lm, aux = train_loss_tail(run_dir, cfg)
    params = flop_count.param_count(cfg.model)
    per_seq = flop_count.training_flops(cfg.model, T)
    seqs = cfg.batch_size * cfg.grad_accum
    return RunResult(
        name=spec.name, family=spec.family, tags=dict(spec.tags), seed=cfg.seed,
        config_hash=spec.config_hash(), model=cfg.model.to_dict(), params=params.total,
        non_embedding_params=params.non_embedding, seq_len=T, batch_size=seqs,
        forward_flops=flop_count.forward_flops(cfg.model, T).total, training_flops=per_seq,
        steps=steps, tokens=steps * seqs * T, train_flops=steps * seqs * per_seq,
        budget=cfg.flops, median_step_s=step_s, step_time_samples=n_samples, train_wall_s=wall,
        eval_wall_s=0.0, resumed=resumed, train_lm_loss=lm, aux_share=aux, eval=evals,
        headline_mode=headline_mode(cfg.model),
        run_dir=str(run_dir.relative_to(ctx.root)),
        checkpoint=str(last.relative_to(ctx.root)))


def evaluate_splits(ctx: Context, model: Any, data_cfg: DataConfig, tokenizer: Any = None
                    ) -> dict[str, dict[str, Any]]:
    """The final evaluation of a model: the fixed held-out windows of the training text ("val")
    and of CPython's pydoc text ("pydoc"), in every routing mode the model has. `tokenizer`: the
    run's own (a retrofit run's Hugging Face tokenizer; None builds the data config's)."""
    from modlm.evaluate import evaluate
    data = ctx.data(data_cfg, tokenizer)
    T = data_cfg.seq_len
    evals = {}
    for split, ids, n_bytes, windows in (("val", data.val, data.val_bytes, ctx.windows),
                                         ("pydoc", data.pydoc, data.pydoc_bytes,
                                          min(PYDOC_WINDOWS, ctx.windows))):
        modes = evaluate(model, ids, n_bytes=n_bytes, seq_len=T, batch_size=EVAL_BATCH,
                         max_batches=math.ceil(windows / EVAL_BATCH))
        evals[split] = {m: r.as_dict() for m, r in modes.items()}
    return evals


def _step_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval" not in r and r.get("tokens_per_s"):
            out.append(r)
    return out


def median_step_time(run_dir: Path, cfg: TrainConfig) -> tuple[float | None, int]:
    """Median seconds per optimizer step over the logged steps after STEP_TIME_SKIP (after half
    the run for runs shorter than twice that), and how many steps it is the median of (the
    trainer logs each logged step's own time as tokens_per_s)."""
    tokens = cfg.batch_size * cfg.grad_accum * cfg.data.seq_len
    records = _step_records(run_dir)
    # A short (smoke) run keeps its later half.
    skip = min(STEP_TIME_SKIP, max((r["step"] for r in records), default=0) // 2)
    times = [tokens / r["tokens_per_s"] for r in records if r["step"] > skip]
    return (statistics.median(times) if times else None), len(times)


def train_loss_tail(run_dir: Path, cfg: TrainConfig) -> tuple[float | None, float | None]:
    """Mean training LM loss and mean aux share (weight x router BCE / LM loss) over the last
    fifth of the logged steps."""
    records = _step_records(run_dir)
    if not records:
        return None, None
    tail = records[-max(1, len(records) // 5):]
    lm = statistics.fmean(r["lm_loss"] for r in tail)
    w = cfg.model.routing.aux_loss_weight
    aux = [w * r["router_aux_loss"] / r["lm_loss"] for r in tail
           if r.get("router_aux_loss") is not None]
    return lm, (statistics.fmean(aux) if aux else None)


def metrics(result_or_dir: RunResult | Path, root: Path | None = None) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl (steps and evaluations)."""
    run_dir = result_or_dir if isinstance(result_or_dir, Path) else root / result_or_dir.run_dir
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if l.strip()]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


# ---- running a whole experiment ----------------------------------------------------------------


def run_experiment(experiment: Experiment, options: Options) -> Path:
    """Run every stage (skipping finished runs), then write the report. Returns the record
    folder."""
    import torch

    from modlm import runtime
    if options.threads:
        torch.set_num_threads(options.threads)
    if experiment.figures:
        from modlm.plots import require_matplotlib
        require_matplotlib()
    ctx = Context(experiment, options)
    _start_record(ctx)
    results: dict[str, RunResult] = {}
    planned: list[dict[str, Any]] = []
    for n, stage in enumerate(experiment.stages, 1):
        specs = stage(ctx, dict(results))
        _check_names(specs, results)
        planned += [{"stage": n, "name": s.name, "family": s.family, "tags": dict(s.tags),
                     "config_hash": s.config_hash(), "train": s.train.to_dict()} for s in specs]
        _write_meta(ctx, planned)
        for i, spec in enumerate(specs, 1):
            results[spec.name] = ctx.run(spec, i, len(specs))
            if experiment.after_run is not None:
                experiment.after_run(ctx, results[spec.name])
    report = experiment.report(ctx, results)
    env = runtime.environment(torch.device("cpu"), "float32", runtime.Dist())
    header = (f"# {experiment.title}\n\n{experiment.description}\n\n"
              f"Reproduce: `{options.command(experiment.name)}` (record folder `{ctx.root}`; "
              f"rerunning skips finished runs).\n"
              f"Machine: {env['cpu_model']}, {env['platform']}, {env['cpu_count']} CPUs, "
              f"{env['torch_threads']} torch threads, torch {env['torch']}, Python "
              f"{env['python']}; git {env['git_revision']}; {time.strftime('%Y-%m-%d')}.\n"
              + training_machines(ctx, results, env["cpu_model"])
              + (f"\n**Budget scale {options.budget_scale:g}: a shrunk smoke run, not a "
                 f"result.**\n" if options.budget_scale != 1.0 else "") + "\n")
    atomic.write_text(ctx.root / "report.md", header + report.markdown.rstrip() + "\n")
    atomic.write_json(ctx.root / "summary.json", report.summary)
    stale = unplanned_runs(ctx, [p["name"] for p in planned])
    if stale:
        print(f"modlm: {len(stale)} run(s) in {ctx.runs_dir} are not part of this plan and not in "
              f"the report (left by an earlier version of the experiment): {', '.join(stale)}; "
              f"delete runs/NAME and results/NAME.json to tidy the record", flush=True)
    return ctx.root


def training_machines(ctx: Context, results: Mapping[str, RunResult], here: str) -> str:
    """A header line naming the processors the runs trained on when any is not this one (a
    record continued on another machine: its runs' timings are comparable within a machine
    only); empty when all trained here."""
    counts: dict[str, int] = {}
    for name in results:
        try:
            env = json.loads((ctx.runs_dir / name / "env.json").read_text())
        except (OSError, ValueError):
            env = {}
        model = env.get("cpu_model", "a processor not recorded") if isinstance(env, dict) else "?"
        counts[model] = counts.get(model, 0) + 1
    if set(counts) <= {here}:
        return ""
    listed = ", ".join(f"{m} ({n} run{'s' if n > 1 else ''})" for m, n in sorted(counts.items()))
    return (f"Runs trained on: {listed}; speeds and step times compare within one processor "
            f"only, and measurements cached in measurements/ were taken where their run "
            f"trained or where the report was first written.\n")


def unplanned_runs(ctx: Context, planned_names: Iterable[str]) -> list[str]:
    """Names of run folders or results in the record that the current plan does not contain."""
    found = {p.name for p in ctx.runs_dir.glob("*") if p.is_dir()}
    found |= {p.stem for p in ctx.results_dir.glob("*.json")}
    return sorted(found - set(planned_names))


def _start_record(ctx: Context) -> None:
    import torch

    from modlm import runtime
    ctx.root.mkdir(parents=True, exist_ok=True)
    meta_path = ctx.root / "experiment.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("budget_scale") != ctx.options.budget_scale:
            raise ConfigError(
                f"{ctx.root} holds this experiment at --budget-scale {old.get('budget_scale')}, "
                f"not {ctx.options.budget_scale}; rerun with that scale to continue it, or use "
                f"another --out")
    gitignore = ctx.root / ".gitignore"
    if not gitignore.exists():
        atomic.write_text(gitignore, "# model weights and optimizer state stay out of git\n"
                                     "runs/*/checkpoints/\n")
    atomic.write_json(ctx.root / "env.json",
                      runtime.environment(torch.device("cpu"), "float32", runtime.Dist()))


def _write_meta(ctx: Context, planned: list[dict[str, Any]]) -> None:
    o = ctx.options
    atomic.write_json(ctx.root / "experiment.json", {
        "experiment": ctx.experiment.name, "title": ctx.experiment.title,
        "command": o.command(ctx.experiment.name), "argv": sys.argv,
        "budget_scale": o.budget_scale, "eval_windows": o.windows,
        "overrides": dict(o.overrides), "runs": planned})


def _check_names(specs: Sequence[RunSpec], results: Mapping[str, RunResult]) -> None:
    seen: set[str] = set()
    for s in specs:
        if s.name in seen or s.name in results:
            raise ConfigError(f"the experiment plans two runs named {s.name!r}")
        seen.add(s.name)


# ---- planning ----------------------------------------------------------------------------------


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
    modlm.measure.train_step_seconds)."""
    import torch

    from modlm.measure import train_step_seconds
    from modlm.model import MoDLM
    from modlm.optim import build_optimizer
    torch.manual_seed(0)
    model = build() if build is not None else MoDLM(model_cfg)
    opt = build_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (batch, seq_len + 1), generator=g)
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


# ---- tables ------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str | None = None) -> str:
    """A markdown table; `align` has one letter per column, l or r (default: text left, numbers
    right)."""
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l"
                        for i in range(len(headers)))
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def results_table(results: Sequence[RunResult], reference: RunResult | None = None,
                  modes: Sequence[str] = ("topk", "router", "predictor")) -> str:
    """The standard per-run table: size, forward FLOPs (relative to `reference` when given),
    steps, median step time, held-out loss in each mode, the headline (causal) loss."""
    headers = ["run", "family", "params", "fwd GFLOP/seq"]
    if reference is not None:
        headers.append(f"fwd FLOPs / {reference.name}")
    headers += ["steps", "step ms"] + [f"loss {m}" for m in modes] + ["headline loss", "bpb"]
    rows = []
    for r in results:
        row: list[Any] = [r.name, r.family, f"{r.params:,d}", f"{r.forward_flops / 1e9:.3f}"]
        if reference is not None:
            row.append(f"{r.forward_flops / reference.forward_flops:.3f}")
        row += [r.steps, "-" if r.median_step_s is None else f"{r.median_step_s * 1e3:.0f}"]
        row += [fmt(r.eval["val"][m]["loss"]) if m in r.eval["val"] else "-" for m in modes]
        row += [f"{fmt(r.headline_loss)} ({r.headline_mode})",
                fmt(r.eval["val"][r.headline_mode]["bpb"], 3)]
        rows.append(row)
    return markdown_table(headers, rows, "llrr" + ("r" if reference else "") + "rr"
                          + "r" * len(modes) + "rr")


def plan_table(plan: Sequence[PlannedRun]) -> str:
    rows = []
    for p in plan:
        rows.append([p.spec.name, p.spec.family, f"{flop_count.param_count(p.spec.model).total:,d}",
                     p.steps, f"{p.train_flops:.3g}",
                     "-" if p.step_s is None else f"{p.step_s * 1e3:.0f}",
                     "-" if p.seconds is None else f"{p.seconds / 60:.1f}"])
    return markdown_table(["run", "family", "params", "steps", "train FLOPs", "step ms",
                           "minutes"], rows, "llrrrrr")
