"""The training loop: `train(TrainConfig)`, for one process or many under `torchrun`.

A run lives in its own folder (`out_dir/run_name/`): `config.json` (the resolved TrainConfig),
`env.json` (versions, device, dtype, git revision), `tokenizer/`, `metrics.jsonl` (one JSON object
per logged step and per evaluation), `checkpoints/` (see modlm.checkpoint), and optional
TensorBoard events under `tb/` (both written by modlm.metrics).

Length is given as optimizer steps, tokens, or a training-FLOP budget converted through
modlm.flops, so dense and MoD runs at the same budget are isoFLOP by construction. AdamW, linear
warm-up then cosine decay over exactly the run (paper Sec 4), gradient clipping and accumulation,
optional bfloat16 autocast and torch.compile. Resuming restores weights, optimizer, schedule
position, RNG and data position: on CPU in float32 a resumed run repeats the uninterrupted run's
losses exactly. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the end of the current step and
exits cleanly. A non-finite loss stops the run without saving (or skips the step, if configured).

Under torchrun each rank draws its rows of one global batch (modlm.data.TrainSampler), gradients
are averaged by DistributedDataParallel, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from modlm import atomic, runtime
from modlm import checkpoint as ckpt
from modlm import flops as flop_count
from modlm.config import ConfigError, TrainConfig
from modlm.data import PreparedData, TrainSampler, prepare_data, split_windows
from modlm.evaluate import ModeResult, evaluate
from modlm.metrics import (
    EvalRecord,
    MetricsWriter,
    StepRecord,
    StepStats,
    evaluation_json,
)
from modlm.model import MoDLM
from modlm.optim import build_optimizer, lr_at, set_lr
from modlm.presets import configure, train_preset  # noqa: F401 (re-exported: modlm.train's API)
from modlm.tokenizer import (
    PretrainedTokenizer,
    Tokenizer,
    TokenizerError,
    has_hf_tokenizer,
    load_tokenizer,
)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what was kept."""


def total_steps(cfg: TrainConfig, world_size: int) -> int:
    seqs_per_step = cfg.batch_size * cfg.grad_accum * world_size
    if cfg.steps is not None:
        return cfg.steps
    if cfg.tokens is not None:
        return max(1, math.ceil(cfg.tokens / (seqs_per_step * cfg.data.seq_len)))
    return flop_count.steps_for_budget(cfg.model, cfg.flops, seqs_per_step, cfg.data.seq_len)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    interrupted: bool
    final_eval: dict[str, Any] | None   # the last evaluation as metrics.jsonl records it
    last_checkpoint: Path | None


class _Progress:
    """One self-rewriting status line on a terminal; silent when stderr is not a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and sys.stderr.isatty() and not os.environ.get("CI")
        self.start = time.perf_counter()

    def update(self, step: int, start_step: int, loss: float, tok_s: float) -> None:
        if not self.enabled:
            return
        done = step - start_step
        eta = (time.perf_counter() - self.start) / max(1, done) * (self.total - step)
        sys.stderr.write(f"\rstep {step}/{self.total}  loss {loss:.4f}  {tok_s:,.0f} tok/s  "
                         f"ETA {eta / 60:.1f} min   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop at the end of the step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def new_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}"
    run_dir = Path(cfg.out_dir) / name
    if run_dir.exists() and any(p.name != atomic.FolderLock.NAME for p in run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists; pick another run_name, or "
                          f"continue it with `modlm train --resume {run_dir}`")
    return run_dir


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no config.json); pass the folder "
                          f"that `modlm train` printed")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it or start a new run") from e
    return TrainConfig.from_dict(saved)


def train(cfg: TrainConfig, *, resume: str | os.PathLike[str] | None = None) -> TrainResult:
    """Train (or, with `resume=RUN_DIR`, continue) a run; returns where it went and how far."""
    d = runtime.init_distributed(cfg.device)
    try:
        return _train(cfg, d, Path(resume) if resume is not None else None)
    finally:
        runtime.shutdown_distributed(d)


@dataclass
class TrainState:
    """Where a run is: the only values the loop changes (saved in every checkpoint)."""

    step: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class _Session:
    """Everything a run holds fixed while it trains."""

    cfg: TrainConfig
    d: runtime.Dist
    device: torch.device
    run_dir: Path
    data: PreparedData
    model: MoDLM                    # the module itself (sharded in place under FSDP)
    train_model: torch.nn.Module    # what the loop calls: DDP / compiled wrapper, or `model`
    optimizer: torch.optim.Optimizer
    sampler: TrainSampler
    routing_gen: torch.Generator
    steps_total: int
    metrics: MetricsWriter | None   # rank 0's; None on the other ranks

    @property
    def tokens_per_step(self) -> int:
        c = self.cfg
        return c.batch_size * c.grad_accum * self.d.world_size * c.data.seq_len

    def flops_at(self, step: int) -> float:
        seqs = self.cfg.batch_size * self.cfg.grad_accum * self.d.world_size
        return step * seqs * flop_count.training_flops(self.cfg.model, self.cfg.data.seq_len)


def _train(cfg: TrainConfig, d: runtime.Dist, resume: Path | None) -> TrainResult:
    lock: atomic.FolderLock | None = None

    def claim() -> Path:
        """Rank 0 picks the run folder and locks it; its refusal reaches every rank."""
        nonlocal lock
        if resume is not None and (resume / "meta.json").exists():
            raise ConfigError(f"--resume takes a run folder, got the checkpoint {resume}; its "
                              f"run folder is {resume.parents[1]} (it resumes from its latest "
                              f"checkpoint)")
        if resume is not None and not (resume / "config.json").exists():
            raise ConfigError(f"--resume takes a run folder (with config.json), got {resume}")
        run_dir = resume if resume is not None else new_run_dir(cfg)
        lock = _lock_run(run_dir)
        return run_dir

    try:
        run_dir = runtime.on_rank_zero(d, claim, share=True)
        assert run_dir is not None
        return _run(cfg, d, run_dir, resume is not None)
    finally:
        if lock is not None:
            lock.release()
            folder = lock.path.parent
            if resume is None and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()      # a new run refused before it wrote anything leaves nothing


def _lock_run(run_dir: Path) -> atomic.FolderLock:
    """One writer per run folder (atomic.FolderLock), taken before anything is read or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {run_dir} ({e.strerror}); choose "
                          f"another out_dir") from None
    return atomic.FolderLock(run_dir).take("wait for it to finish or stop it (two trainers in "
                                          "one run folder would interleave their records)")


def _run(cfg: TrainConfig, d: runtime.Dist, run_dir: Path, resume: bool) -> TrainResult:
    s, state, resumed = _start(cfg, d, run_dir, resume)
    start_step = state.step
    progress = _Progress(s.steps_total, d.is_main)
    final_eval = None
    last_ckpt = ckpt.latest_checkpoint(s.run_dir) if resumed else None
    interrupted = False
    s.model.train()
    with _StopFlag() as stop:
        while state.step < s.steps_total:
            t0 = time.perf_counter()
            lr = lr_at(state.step, s.steps_total, s.cfg.lr, s.cfg.warmup_steps,
                       s.cfg.min_lr_ratio)
            set_lr(s.optimizer, lr)
            st = _forward_backward(s)
            if st.finite:
                s.optimizer.step()
            elif s.cfg.on_nonfinite == "stop":
                last = ckpt.latest_checkpoint(s.run_dir)
                raise TrainingError(
                    f"non-finite loss or gradient (loss {st.loss}, gradient norm {st.grad_norm}) "
                    f"at step {state.step + 1}; stopped without saving. The last good checkpoint "
                    f"is {last or 'none (no checkpoint yet)'}; lower lr, raise warmup_steps, or "
                    f"set on_nonfinite=skip")
            s.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += s.tokens_per_step  # drawn and consumed, even by a skipped step
            tok_s = s.tokens_per_step / (time.perf_counter() - t0)
            progress.update(state.step, start_step, st.loss, tok_s)
            last_step = state.step == s.steps_total
            if not st.finite or state.step % s.cfg.log_every == 0 or last_step:
                _log(s, StepRecord(state.step, state.tokens, s.flops_at(state.step), lr, tok_s,
                                   st))
            val_loss = None
            if state.step % s.cfg.eval_every == 0 or last_step:
                record = EvalRecord(state.step, state.tokens, s.flops_at(state.step),
                                    _evaluate_splits(s))
                val_loss = _headline_loss(record.evaluation["val"])
                final_eval = evaluation_json(record.evaluation)
                _log(s, record)
                if d.is_main:
                    progress.close()
                    print(record.line(), flush=True)
            stop_now = _agree(stop.requested, d)
            if state.step % s.cfg.checkpoint_every == 0 or last_step or stop_now:
                last_ckpt = _save(s, state, val_loss) or last_ckpt
            if stop_now:
                interrupted = True
                break
    progress.close()
    if s.metrics is not None:
        s.metrics.close()
    return TrainResult(s.run_dir, state.step, s.steps_total, interrupted, final_eval, last_ckpt)


def _resolve_tokenizer(cfg: TrainConfig) -> TrainConfig:
    """data.tokenizer "auto" made concrete (what config.json records): a retrofit run reads its
    source model's own tokenizer ("hf"), any other run bytes. A retrofit source folder without a
    tokenizer is refused: byte or GPT-2 ids would mean nothing to a pretrained model unless the
    user chose them on purpose."""
    if cfg.data.tokenizer != "auto":
        return cfg
    if not cfg.retrofit.enabled:
        name = "bytes"
    elif cfg.retrofit.source is not None and has_hf_tokenizer(cfg.retrofit.source):
        name = "hf"
    else:
        raise ConfigError(f"retrofit.source {cfg.retrofit.source} holds no Hugging Face "
                          f"tokenizer (tokenizer.json or tokenizer_config.json): save the "
                          f"model's tokenizer there (tokenizer.save_pretrained), or choose one "
                          f"with --set data.tokenizer=bytes|bpe|gpt2")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=name))


def _source_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """A new retrofit run's tokenizer: the one in its source folder (saved with the run)."""
    if cfg.retrofit.source is None:
        raise ConfigError("data.tokenizer 'hf' reads the tokenizer of retrofit.source; set it")
    try:
        return PretrainedTokenizer.from_folder(cfg.retrofit.source)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None


def _start(cfg: TrainConfig, d: runtime.Dist, run_dir: Path,
           resume: bool) -> tuple[_Session, TrainState, bool]:
    """Set a run up (new, or resumed from its newest checkpoint that verifies) and write its
    folder. A resumed run with no checkpoint yet (killed before its first) starts again from
    step 0 with its recorded config."""
    device = runtime.resolve_device(cfg.device, d.local_rank)
    cfg = _resolve_tokenizer(cfg)
    loaded = None
    if resume:
        with runtime.rank_zero_first(d):     # rank 0 sets damaged checkpoints aside first
            loaded = ckpt.load_for_resume(
                run_dir, expected_model_cfg=cfg.model, set_aside_damaged=d.is_main,
                say=(lambda m: print(m, flush=True)) if d.is_main else None)
        if loaded is None and d.is_main:
            print(f"modlm: {run_dir} has no checkpoint yet (stopped before its first); starting "
                  f"it again from step 0 with its recorded config", flush=True)

    tokenizer = loaded.tokenizer if loaded else None
    if tokenizer is None and resume and (run_dir / "tokenizer").is_dir():
        tokenizer = load_tokenizer(run_dir / "tokenizer")     # the run's own, as recorded
    if tokenizer is None and cfg.data.tokenizer == "hf":
        tokenizer = _source_tokenizer(cfg)
    with runtime.rank_zero_first(d):
        data = prepare_data(cfg.data, tokenizer=tokenizer)
    if not cfg.retrofit.enabled and cfg.model.vocab_size != data.tokenizer.vocab_size:
        if loaded is not None:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) differs from the run's "
                              f"tokenizer ({data.tokenizer.vocab_size} ids)")
        # The tokenizer decides the vocabulary: a BPE or GPT-2 run needs no extra override.
        # The resolved value is what config.json records.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, vocab_size=data.tokenizer.vocab_size))
        if d.is_main:
            print(f"model.vocab_size set to {cfg.model.vocab_size} to match the "
                  f"{cfg.data.tokenizer} tokenizer", flush=True)

    torch.manual_seed(cfg.seed)
    if cfg.retrofit.enabled:
        # The Hugging Face config decides the model section (recorded in config.json like any
        # resolved value); a new run loads the pretrained weights, a resumed one its checkpoint's.
        from modlm.hf.retrofit import build_for_training
        cfg, model = build_for_training(cfg, data.tokenizer, pretrained=loaded is None)
    else:
        runtime.check_fits(flop_count.param_count(cfg.model).total, 16, "the model",
                           "lower model.d_model, model.n_layers, model.d_mlp or the vocabulary")
        model = MoDLM(cfg.model)
    model = model.to(device)
    # Routing randomness (the random-routing control) differs per rank, like the rows it scores.
    routing_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 1_000_003 * d.rank)
    sampler = TrainSampler(data.train, batch_size=cfg.batch_size, seq_len=cfg.data.seq_len,
                           seed=cfg.data.seed, rank=d.rank, world_size=d.world_size)
    state = TrainState()
    if loaded is not None:
        t = loaded.state["trainer"]
        if int(t["world_size"]) != d.world_size:
            raise ConfigError(f"this run was checkpointed with {t['world_size']} processes; "
                              f"resume it with the same number (got {d.world_size})")
        model.load_state_dict(loaded.model_state)  # full weights, before any sharding
        state = TrainState(step=int(t["step"]), tokens=int(t["tokens"]))
        sampler.load_state_dict(t["sampler"])
        torch.set_rng_state(t["rng"])
        routing_gen.set_state(t["routing_rng"])

    train_model = _parallelize(model, cfg, d, device)
    # After sharding: FSDP2 replaces the parameters with sharded ones the optimizer must see.
    lr_scales = (model.parameter_lr_scales(cfg.lr, cfg.retrofit.pretrained_lr)
                 if cfg.retrofit.enabled else None)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=cfg.betas, eps=cfg.eps, decay_all=cfg.decay_all,
                                lr_scales=lr_scales)
    if loaded is not None:
        _load_optimizer_state(model, optimizer, loaded.state["optimizer"], cfg.fsdp)
    if cfg.compile:
        train_model = torch.compile(train_model)

    def write_records() -> MetricsWriter:
        """Rank 0 writes the run's records; its error reaches every rank (on_rank_zero)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(run_dir / "config.json", cfg.to_dict())
        env_name = "env.json" if not resume else f"env.resume-{state.step:08d}.json"
        atomic.write_json(run_dir / env_name, runtime.environment(device, cfg.dtype, d))
        if not (run_dir / "tokenizer").exists():
            data.tokenizer.save(run_dir / "tokenizer")
        metrics = MetricsWriter(run_dir, tensorboard=cfg.tensorboard)
        if resume:
            metrics.drop_after(state.step)
        return metrics

    metrics = runtime.on_rank_zero(d, write_records)
    session = _Session(cfg, d, device, run_dir, data, model, train_model, optimizer, sampler,
                       routing_gen, total_steps(cfg, d.world_size), metrics)
    return session, state, loaded is not None


def _parallelize(model: MoDLM, cfg: TrainConfig, d: runtime.Dist,
                 device: torch.device) -> torch.nn.Module:
    """FSDP2 shards `model` in place (and returns it); DDP wraps it; one process uses it as is."""
    if cfg.fsdp:
        if not d.enabled:
            raise ConfigError("fsdp=true shards the model over processes; launch with "
                              "`torchrun --nproc_per_node=N -m modlm train ...`")
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    if not d.enabled:
        return model
    r = cfg.model.routing
    # An expert that receives no token in a step gets no gradient, nor does a block that a
    # threshold router routes no token into: DDP must be told.
    unused = (r.router_weight == "constant" and r.aux_loss_weight == 0) or (
        r.predictor and r.predictor_loss_weight == 0) or bool(cfg.model.moe_layers) or (
        r.router == "threshold")
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=unused)


def _log(s: _Session, record: StepRecord | EvalRecord) -> None:
    if s.metrics is not None:    # rank 0 writes the run's records
        s.metrics.write(record)


def _evaluate_splits(s: _Session) -> dict[str, dict[str, ModeResult]]:
    result = {}
    for split, ids, n_bytes in (("val", s.data.val, s.data.val_bytes),
                                ("pydoc", s.data.pydoc, s.data.pydoc_bytes)):
        # The same windows whatever the number of processes (when it divides batch_size).
        result[split] = evaluate(s.model, ids, n_bytes=n_bytes, seq_len=s.cfg.data.seq_len,
                                 batch_size=max(1, s.cfg.batch_size // s.d.world_size),
                                 max_batches=s.cfg.eval_batches, device=s.device,
                                 dtype=s.cfg.dtype, d=s.d)
    return result


def _save(s: _Session, state: TrainState, val_loss: float | None) -> Path | None:
    trainer_state = {"step": state.step, "tokens": state.tokens, "flops": s.flops_at(state.step),
                     "sampler": s.sampler.state_dict(), "rng": torch.get_rng_state(),
                     "routing_rng": s.routing_gen.get_state(), "world_size": s.d.world_size,
                     "total_steps": s.steps_total}
    model_state, optimizer_state = _full_states(s.model, s.optimizer, s.cfg.fsdp)  # collective
    # Rank 0 writes; the others wait for it, and a failure (disk full) stops every rank.
    return runtime.on_rank_zero(s.d, lambda: ckpt.save_checkpoint(
        s.run_dir, step=state.step, model=s.model, optimizer_state=optimizer_state,
        trainer_state=trainer_state, model_cfg=s.cfg.model, tokenizer=s.data.tokenizer,
        run_config=s.cfg.to_dict(), val_loss=val_loss, keep_last=s.cfg.keep_last,
        model_state=model_state))


def _step_values(out: Any, varying: bool = False) -> dict[str, torch.Tensor]:
    """The scalars a step record reports from one forward, by name; absent ones left out. The
    names depend only on the model's configuration, so they agree across micro-batches and
    processes. varying: the routed counts vary in the training forward (log the fractions)."""
    values = {"loss": out.loss, "lm_loss": out.lm_loss, "router_aux_loss": out.router_aux_loss,
              "predictor_loss": out.predictor_loss,
              "moe_balance_loss": out.moe_balance_loss if out.moe else None}
    for i, r in enumerate(out.routing):
        values[f"router_accuracy.{i}"] = r.router_accuracy
        values[f"predictor_accuracy.{i}"] = r.predictor_accuracy
        values[f"kv_fraction.{i}"] = r.kv_fraction
        if varying:
            values[f"routed_fraction.{i}"] = r.fraction
    for i, m in enumerate(out.moe or ()):
        values[f"moe_noop.{i}"], values[f"moe_dropped.{i}"] = m.noop, m.dropped
    return {k: v.detach().double() for k, v in values.items() if v is not None}


def _forward_backward(s: _Session) -> StepStats:
    """Accumulate gradients over cfg.grad_accum micro-batches, then clip (or just measure) them."""
    cfg, d, model = s.cfg, s.d, s.model
    sums: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        windows_BT1 = s.sampler.next_batch().to(s.device)
        x_BT, y_BT = split_windows(windows_BT1)
        sync = micro == cfg.grad_accum - 1  # reduce gradients across processes once per step
        ctx = contextlib.nullcontext()
        if d.enabled and cfg.fsdp:
            model.set_requires_gradient_sync(sync)
        elif d.enabled and not sync:
            ctx = s.train_model.no_sync()
        with ctx:
            with runtime.autocast(s.device, cfg.dtype):
                out = s.train_model(x_BT, y_BT, generator=s.routing_gen)
            (out.loss / cfg.grad_accum).backward()
        for name, value in _step_values(out, cfg.model.routing.router == "threshold").items():
            sums[name] = sums.get(name, 0.0) + value / cfg.grad_accum   # stays on the device
    names = sorted(sums)
    # One reduction and one device-to-host copy per step, whatever the number of values.
    averaged = runtime.all_reduce_mean(torch.stack([sums[n] for n in names]), d).tolist()
    mean = dict(zip(names, averaged))
    # No clipping when grad_clip is 0, but the norm is still measured: a non-finite gradient
    # (e.g. a bfloat16 overflow) must not reach the weights even when the loss is finite.
    grad_norm = _clip_grad_norm(model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)

    def per_layer(prefix: str) -> list[float]:
        return [mean[n] for n in sorted((n for n in names if n.startswith(prefix + ".")),
                                        key=lambda n: int(n.rsplit(".", 1)[1]))]
    # The fractions routed are exactly the capacity in the top-k training forward (logged where
    # they are not: a threshold router); the agreement of the causal rules with top-k is learned.
    return StepStats(
        loss=mean["loss"], lm_loss=mean["lm_loss"],
        router_aux_loss=mean.get("router_aux_loss"), predictor_loss=mean.get("predictor_loss"),
        router_accuracy=tuple(per_layer("router_accuracy")),
        predictor_accuracy=tuple(per_layer("predictor_accuracy")),
        grad_norm=grad_norm, moe_balance_loss=mean.get("moe_balance_loss"),
        moe_noop=tuple(per_layer("moe_noop")), moe_dropped=tuple(per_layer("moe_dropped")),
        routed_fraction=tuple(per_layer("routed_fraction")),
        kv_fraction=tuple(per_layer("kv_fraction")))


def _clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        norm = norm.full_tensor()
    return float(norm)


def _full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 fsdp: bool) -> tuple[dict | None, dict]:
    """Unsharded model and optimizer state (every rank must call this under FSDP)."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if model.cfg.tie_embeddings and "embed.weight" in model_state:
        # Gathering unties the shared tensor; re-tie it so the checkpoint stores it once, as an
        # unsharded model's checkpoint does.
        model_state["lm_head.weight"] = model_state["embed.weight"]
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def _load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _headline_loss(modes: Mapping[str, ModeResult]) -> float:
    """The honest validation loss: the best causal mode for MoD models, top-k for dense ones."""
    causal = [modes[m].loss for m in ("router", "predictor") if m in modes]
    return min(causal) if causal else modes["topk"].loss


def _agree(flag: bool, d: runtime.Dist) -> bool:
    """Every rank stops at the same step if any rank was asked to."""
    if not d.enabled:
        return flag
    t = runtime.all_reduce(torch.tensor([1.0 if flag else 0.0]), d, dist.ReduceOp.MAX)
    return bool(t.item())
