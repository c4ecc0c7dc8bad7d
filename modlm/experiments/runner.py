"""The resumable experiment runner and the record folder each experiment writes.

`Context` is what an experiment's stages and report use (options, the record folder, budget
helpers, data, running a spec, cached measurements, trained models). `run_experiment` runs every
stage's specs through `modlm.train.train`, evaluates the final weights on a fixed held-out set in
every routing mode, stores one `RunResult` per run (spec.py) and writes the report.

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
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from modlm import atomic
from modlm import flops as flop_count
from modlm.config import ConfigError, DataConfig, ModelConfig, TrainConfig, apply_overrides
from modlm.experiments.spec import (
    EVAL_BATCH,
    MIN_STEPS,
    Experiment,
    Options,
    RunResult,
    RunSpec,
    headline_mode,
    recorded_config_hash,
)
from modlm.experiments.tables import ms

STEP_TIME_SKIP = 10        # optimizer steps left out of the median step time (warm-up)
PYDOC_WINDOWS = 64         # windows of the second, out-of-domain evaluation set


class ExperimentInterrupted(RuntimeError):
    """A run was interrupted (Ctrl-C / SIGTERM) after saving a checkpoint; rerun to continue."""


# ---- the context stages and reports see --------------------------------------------------------


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


# ---- running a whole experiment ----------------------------------------------------------------


def run_experiment(experiment: Experiment, options: Options) -> Path:
    """Run every stage (skipping finished runs), then write the report. Returns the record
    folder."""
    import torch

    from modlm import runtime
    if options.threads:
        torch.set_num_threads(options.threads)
    if experiment.figures:
        from modlm.experiments.plots import require_matplotlib
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
