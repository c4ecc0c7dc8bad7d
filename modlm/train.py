"""The training loop: `train(TrainConfig)`, for one process or many under `torchrun`.

A run lives in its own folder (`out_dir/run_name/`): `config.json` (the resolved TrainConfig),
`env.json` (versions, device, dtype, git revision), `tokenizer/`, `metrics.jsonl` (one JSON object
per logged step and per evaluation), `checkpoints/` (see modlm.checkpoint), and optional
TensorBoard events under `tb/`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.distributed as dist

from modlm import checkpoint as ckpt
from modlm import flops as flop_count
from modlm import runtime
from modlm.config import ConfigError, ModelConfig, _check, _positive_int, _reject_unknown
from modlm.data import DataConfig, TrainSampler, prepare_data
from modlm.evaluate import evaluate
from modlm.model import MoDLM
from modlm.optim import build_optimizer, lr_at, set_lr
from modlm.presets import get_preset


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what was kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the data on disk; saved as the run's config.json.

    Length: exactly one of `steps`, `tokens` (total training tokens, all processes) or `flops`
    (total training FLOPs by modlm.flops) is used; `steps` wins if several are set.
    `fsdp`: under torchrun, shard parameters, gradients and optimizer state with FSDP2
    (`fully_shard` per block, then the whole model) instead of replicating them with DDP.
    `batch_size` is per process and per micro-step; the global batch is
    batch_size * grad_accum * world_size sequences of data.seq_len tokens.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "custom"
    steps: int | None = None
    tokens: int | None = None
    flops: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    decay_all: bool = False
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    fsdp: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    out_dir: str = "runs"
    run_name: str | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        if isinstance(self.data, Mapping):
            object.__setattr__(self, "data", DataConfig.from_dict(self.data))
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        _check(self.steps is not None or self.tokens is not None or self.flops is not None,
               "set the training length: steps=N, tokens=N or flops=X (a training-FLOP budget)")
        for name in ("steps", "tokens"):
            v = getattr(self, name)
            _check(v is None or _positive_int(v), f"{name} must be a positive integer, got {v!r}")
        _check(self.flops is None or self.flops > 0, f"flops must be > 0, got {self.flops}")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every", "keep_last", "log_every"):
            v = getattr(self, name)
            _check(_positive_int(v), f"{name} must be a positive integer, got {v!r}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
               f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _check(self.dtype in runtime.DTYPES,
               f"dtype must be one of {runtime.DTYPES} (float16 is ~100x slower on CPU), "
               f"got {self.dtype!r}")
        _check(self.device in ("auto", "cpu", "cuda"),
               f"device must be auto, cpu or cuda, got {self.device!r}")
        _check(self.on_nonfinite in ("stop", "skip"),
               f"on_nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        _check(self.data.seq_len <= self.model.max_seq_len,
               f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
               f"({self.model.max_seq_len}); lower data.seq_len or raise model.max_seq_len")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"], d["data"] = self.model.to_dict(), self.data.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        _reject_unknown(cls, d, "")
        return cls(**d)


def train_preset(name: str) -> TrainConfig:
    """A model preset with training defaults sized for it (the CLI's `--preset`)."""
    model = get_preset(name)
    base = name.removesuffix("-dense")
    length = {"tiny": dict(steps=60, batch_size=8, eval_every=30, checkpoint_every=30,
                           warmup_steps=10, log_every=5, eval_batches=4),
              "small": dict(steps=300, batch_size=16, eval_every=100, checkpoint_every=100,
                            warmup_steps=30)}.get(base, dict(steps=1000))
    return TrainConfig(model=model, data=DataConfig(seq_len=model.max_seq_len), preset=name,
                       **length)


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
    final_eval: dict[str, Any] | None
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

    def __enter__(self) -> "_StopFlag":
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


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop records a killed run logged past its last checkpoint."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def new_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}"
    run_dir = Path(cfg.out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists; pick another run_name, or "
                          f"continue it with `modlm train --resume {run_dir}`")
    return run_dir


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no config.json); pass the folder "
                          f"that `modlm train` printed")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def train(cfg: TrainConfig, *, resume: str | os.PathLike[str] | None = None) -> TrainResult:
    """Train (or, with `resume=RUN_DIR`, continue) a run; returns where it went and how far."""
    d = runtime.init_distributed(cfg.device)
    try:
        return _train(cfg, d, Path(resume) if resume is not None else None)
    finally:
        runtime.shutdown_distributed(d)


def _train(cfg: TrainConfig, d: runtime.Dist, resume: Path | None) -> TrainResult:
    device = runtime.resolve_device(cfg.device, d.local_rank)
    run_dir = resume if resume is not None else new_run_dir(cfg)
    loaded = ckpt.load_checkpoint(ckpt.resolve_checkpoint(run_dir), expected_model_cfg=cfg.model) \
        if resume is not None else None

    with runtime.rank_zero_first(d):
        data = prepare_data(cfg.data, tokenizer=loaded.tokenizer if loaded else None)
    if cfg.model.vocab_size != data.tokenizer.vocab_size:
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
    model = MoDLM(cfg.model).to(device)
    routing_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    sampler = TrainSampler(data.train, batch_size=cfg.batch_size, seq_len=cfg.data.seq_len,
                           seed=cfg.data.seed, rank=d.rank, world_size=d.world_size)
    steps_total = total_steps(cfg, d.world_size)
    step = tokens_seen = 0
    best_val: float | None = None
    if loaded is not None:
        t = loaded.state["trainer"]
        if int(t["world_size"]) != d.world_size:
            raise ConfigError(f"this run was checkpointed with {t['world_size']} processes; "
                              f"resume it with the same number (got {d.world_size})")
        model.load_state_dict(loaded.model_state)  # full weights, before any sharding
        step, tokens_seen = int(t["step"]), int(t["tokens"])
        best_val = t.get("best_val")
        sampler.load_state_dict(t["sampler"])
        torch.set_rng_state(t["rng"])
        routing_gen.set_state(t["routing_rng"])

    train_model: torch.nn.Module = model
    if cfg.fsdp:
        if not d.enabled:
            raise ConfigError("fsdp=true shards the model over processes; launch with "
                              "`torchrun --nproc_per_node=N -m modlm train ...`")
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    elif d.enabled:
        r = cfg.model.routing
        unused = (r.router_weight == "constant" and r.aux_loss_weight == 0) or (
            r.predictor and r.predictor_loss_weight == 0)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused)
    # After sharding: FSDP2 replaces the parameters with sharded ones the optimizer must see.
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=cfg.betas, eps=cfg.eps, decay_all=cfg.decay_all)
    if loaded is not None:
        _load_optimizer_state(model, optimizer, loaded.state["optimizer"], cfg.fsdp)
    if cfg.compile:
        train_model = torch.compile(train_model)

    metrics_path = run_dir / "metrics.jsonl"
    tb = None
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(run_dir / "config.json", cfg.to_dict())
        _write_json_atomic(run_dir / "env.json", runtime.environment(device, cfg.dtype, d))
        if not (run_dir / "tokenizer").exists():
            data.tokenizer.save(run_dir / "tokenizer")
        if loaded is not None:
            _truncate_metrics(metrics_path, step)
        if cfg.tensorboard:
            tb = _tensorboard(run_dir / "tb")

    per_step_flops = flop_count.training_flops(cfg.model, cfg.data.seq_len) * (
        cfg.batch_size * cfg.grad_accum * d.world_size)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * d.world_size * cfg.data.seq_len

    def log(record: dict[str, Any]) -> None:
        if d.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if tb is not None:
                _tb_write(tb, record)

    def run_eval() -> dict[str, Any]:
        result = {}
        for split, ids, n_bytes in (("val", data.val, data.val_bytes),
                                    ("pydoc", data.pydoc, data.pydoc_bytes)):
            modes = evaluate(model, ids, n_bytes=n_bytes, seq_len=cfg.data.seq_len,
                             batch_size=cfg.batch_size, max_batches=cfg.eval_batches,
                             device=device, dtype=cfg.dtype, d=d)
            result[split] = {m: r.as_dict() for m, r in modes.items()}
        return result

    def save(val_loss: float | None) -> Path | None:
        trainer_state = {"step": step, "tokens": tokens_seen, "flops": step * per_step_flops,
                         "sampler": sampler.state_dict(), "rng": torch.get_rng_state(),
                         "routing_rng": routing_gen.get_state(), "best_val": best_val,
                         "world_size": d.world_size, "total_steps": steps_total}
        path = None
        model_state, optimizer_state = _full_states(model, optimizer, cfg.fsdp)  # collective
        if d.is_main:
            path = ckpt.save_checkpoint(
                run_dir, step=step, model=model, optimizer_state=optimizer_state,
                trainer_state=trainer_state, model_cfg=cfg.model, tokenizer=data.tokenizer,
                run_config=cfg.to_dict(), val_loss=val_loss, keep_last=cfg.keep_last,
                model_state=model_state)
        if d.enabled:
            dist.barrier()
        return path

    start_step = step
    progress = _Progress(steps_total, d.is_main)
    final_eval = None
    last_ckpt = None
    interrupted = False
    model.train()
    with _StopFlag() as stop:
        while step < steps_total:
            t0 = time.perf_counter()
            set_lr(optimizer, lr := lr_at(step, steps_total, cfg.lr, cfg.warmup_steps,
                                          cfg.min_lr_ratio))
            sums = torch.zeros(4, dtype=torch.float64)  # loss, lm, aux, predictor
            pred_acc: list[float] = []
            router_acc: list[float] = []
            for micro in range(cfg.grad_accum):
                windows = sampler.next_batch().to(device)
                x, y = windows[:, :-1], windows[:, 1:]
                sync = micro == cfg.grad_accum - 1 or not d.enabled
                ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    with runtime.autocast(device, cfg.dtype):
                        out = train_model(x, y, generator=routing_gen)
                    (out.loss / cfg.grad_accum).backward()
                sums += torch.tensor([_f(out.loss), _f(out.lm_loss),
                                      _f(out.router_aux_loss), _f(out.predictor_loss)],
                                     dtype=torch.float64) / cfg.grad_accum
                # Routing statistics of the last micro-batch (fractions are exactly the capacity
                # in the top-k training forward; the agreement of the causal rules is not).
                pred_acc = [_f(s.predictor_accuracy) for s in out.routing
                            if s.predictor_accuracy is not None]
                router_acc = [_f(s.router_accuracy) for s in out.routing
                              if s.router_accuracy is not None]
            sums = runtime.all_reduce_mean(sums, d)
            loss = float(sums[0])
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                if cfg.on_nonfinite == "stop":
                    last = ckpt.latest_checkpoint(run_dir)
                    raise TrainingError(
                        f"non-finite loss ({loss}) at step {step + 1}; stopped without saving. "
                        f"The last good checkpoint is {last or 'none (no checkpoint yet)'}; "
                        f"lower lr, raise warmup_steps, or set on_nonfinite=skip")
                step += 1
                log({"step": step, "skipped": True, "loss": loss})
                continue
            grad_norm = (_clip_grad_norm(model, cfg.grad_clip) if cfg.grad_clip > 0 else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            tok_s = tokens_per_step / (time.perf_counter() - t0)
            progress.update(step, start_step, loss, tok_s)
            if step % cfg.log_every == 0 or step == steps_total:
                log({"step": step, "tokens": tokens_seen, "flops": step * per_step_flops,
                     "loss": loss, "lm_loss": float(sums[1]),
                     "router_aux_loss": float(sums[2]) if cfg.model.routed_layers else None,
                     "predictor_loss": float(sums[3]) if cfg.model.routing.predictor
                     and cfg.model.routed_layers else None,
                     "predictor_accuracy": pred_acc or None,
                     "router_accuracy": router_acc or None, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tok_s})
            val_loss = None
            if step % cfg.eval_every == 0 or step == steps_total:
                final_eval = run_eval()
                val_loss = _headline_loss(final_eval["val"])
                best_val = val_loss if best_val is None else min(best_val, val_loss)
                log({"step": step, "tokens": tokens_seen, "flops": step * per_step_flops,
                     "eval": final_eval})
                if d.is_main:
                    progress.close()
                    print(_eval_line(step, final_eval), flush=True)
            stop_now = _agree(stop.requested, d)
            if step % cfg.checkpoint_every == 0 or step == steps_total or stop_now:
                last_ckpt = save(val_loss) or last_ckpt
            if stop_now:
                interrupted = True
                break
    progress.close()
    if tb is not None:
        tb.close()
    return TrainResult(run_dir, step, steps_total, interrupted, final_eval, last_ckpt)


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
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
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
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_optimizer_state_dict)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _headline_loss(modes: dict[str, Any]) -> float:
    """The honest validation loss: the best causal mode for MoD models, top-k for dense ones."""
    causal = [modes[m]["loss"] for m in ("router", "predictor") if m in modes]
    return min(causal) if causal else modes["topk"]["loss"]


def _eval_line(step: int, ev: dict[str, Any]) -> str:
    parts = []
    for split, modes in ev.items():
        parts.append(split + " " + " ".join(f"{m} {r['loss']:.4f} ({r['bpb']:.3f} bpb)"
                                            for m, r in modes.items()))
    return f"eval @ step {step}: " + " | ".join(parts)


def _agree(flag: bool, d: runtime.Dist) -> bool:
    """Every rank stops at the same step if any rank was asked to."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _f(t: torch.Tensor | None) -> float:
    return float(t.detach()) if t is not None else 0.0


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("tensorboard=true needs the tensorboard package: "
                          "pip install 'modlm[tensorboard]'") from e
    return SummaryWriter(str(path))


def _tb_write(tb, record: dict[str, Any]) -> None:
    step = record["step"]
    for key in ("loss", "lm_loss", "router_aux_loss", "predictor_loss", "lr", "tokens_per_s"):
        if record.get(key) is not None:
            tb.add_scalar(f"train/{key}", record[key], step)
    for split, modes in record.get("eval", {}).items():
        for mode, r in modes.items():
            tb.add_scalar(f"{split}/{mode}_loss", r["loss"], step)
            tb.add_scalar(f"{split}/{mode}_bpb", r["bpb"], step)
