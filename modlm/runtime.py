"""Devices, dtypes, processes and the environment record: decided here and nowhere else.

- Device: "auto" picks CUDA when present, else CPU. Model code never moves tensors itself.
- Dtype: float32 everywhere by default (what the tests use, and on CPU the exact-resume
  guarantee); "bfloat16" runs the forward under autocast (parameters and optimizer state stay
  float32; router logits, top-k and losses stay float32 inside the model). float16 is refused on
  CPU, where it is about 100x slower than float32.
- Processes: under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) a process group
  is set up with NCCL on CUDA and gloo on CPU; `Dist` says who we are. What rank 0 alone does
  (lock and write the run folder, pick the checkpoint to resume from) runs through
  `on_rank_zero` / `rank_zero_first`, which raise its error on every rank: all exit with the same
  one-line error, and none waits at a collective for a rank that left.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from modlm.config import DTYPES, ConfigError

T = TypeVar("T")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available; "
                              "use --set device=cpu (or auto)")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The forward pass's numerics: a no-op for float32, bfloat16 autocast otherwise."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"dtype must be one of {DTYPES} (float16 is not supported: on CPU it is "
                     f"~100x slower), got {dtype!r}")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_LAUNCH = ("launch with `torchrun --nproc_per_node=N -m modlm ...`, which sets RANK, WORLD_SIZE, "
           "LOCAL_RANK, MASTER_ADDR and MASTER_PORT, or unset them for one process")


def distributed_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, or None for one process;
    inconsistent or non-numeric values raise ConfigError naming the variable (before any
    process group is set up, so nothing waits for peers that will never come)."""
    env = os.environ if env is None else env

    def number(name: str) -> int | None:
        value = env.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a whole number; {_LAUNCH}") from None

    world, rank, local = number("WORLD_SIZE"), number("RANK"), number("LOCAL_RANK")
    if world is None:
        if rank not in (None, 0):
            raise ConfigError(f"RANK={rank} is set but WORLD_SIZE is not; {_LAUNCH}")
        return None
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} must be at least 1; {_LAUNCH}")
    if world == 1 and rank in (None, 0):
        return None
    if rank is None:
        raise ConfigError(f"WORLD_SIZE={world} is set but RANK is not; {_LAUNCH}")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); "
                          f"{_LAUNCH}")
    if local is not None and local < 0:
        raise ConfigError(f"LOCAL_RANK={local} must not be negative; {_LAUNCH}")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set; {_LAUNCH}")
    port = number("MASTER_PORT")
    if port is None or not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT={env.get('MASTER_PORT')!r} is not a port (1-65535); "
                          f"{_LAUNCH}")
    return rank, world, rank if local is None else local


def memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(n_params: int, bytes_per_param: int, what: str, fix: str) -> None:
    """Refuse, before allocating, a model whose parameters alone (n_params x bytes_per_param)
    exceed this machine's memory."""
    need, have = n_params * bytes_per_param, memory_bytes()
    if have is not None and need > have:
        raise ConfigError(f"{what} has {n_params:,d} parameters, about {need / 2**30:,.1f} GiB "
                          f"to train ({bytes_per_param} bytes each: weights, gradients, AdamW "
                          f"moments), more than this machine's {have / 2**30:,.1f} GiB; {fix}")


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes; a single process needs no group."""
    found = distributed_env()
    if found is None:
        return Dist()
    rank, world, local = found
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        setup = setup_timeout()
        try:
            # Set-up waits at most `setup` for every rank to join (torch's default, 30 minutes,
            # would leave a rank started alone hanging); later collectives keep the default.
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=setup)
        except (RuntimeError, ValueError) as e:   # torch's DistNetworkError is a RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"could not join the process group at "
                              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} as rank "
                              f"{rank} of {world} within {setup.total_seconds():g} s ({first}); "
                              f"start every rank (torchrun does) or raise "
                              f"{SETUP_TIMEOUT_VAR}; {_LAUNCH}") from None
        from torch.distributed import distributed_c10d
        if hasattr(distributed_c10d, "_set_pg_timeout"):
            distributed_c10d._set_pg_timeout(distributed_c10d.default_pg_timeout)
    return Dist(rank, world, local)


SETUP_TIMEOUT_VAR = "MODLM_DIST_SETUP_TIMEOUT"


def setup_timeout(env: Mapping[str, str] | None = None) -> timedelta:
    """How long joining a process group may wait for the other ranks: $MODLM_DIST_SETUP_TIMEOUT
    seconds, default 120."""
    env = os.environ if env is None else env
    text = env.get(SETUP_TIMEOUT_VAR, "120")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e7:
        raise ConfigError(f"{SETUP_TIMEOUT_VAR}={text!r} is not a number of seconds; unset it "
                          f"or give a positive number")
    return timedelta(seconds=seconds)


def shutdown_distributed(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()  # FSDP2 on gloo needs every rank here before the group goes away
        dist.destroy_process_group()


def collective_device(backend: str, device: torch.device, d: Dist) -> torch.device:
    """Where a tensor on `device` must be for a collective: NCCL reduces CUDA tensors only, so a
    host tensor (a stop flag, evaluation sums) goes to this process's GPU; gloo takes any."""
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def all_reduce(t: torch.Tensor, d: Dist, op: Any = None) -> torch.Tensor:
    """t reduced across processes (default: summed), a new tensor on t's device; t itself for
    one process."""
    if not d.enabled:
        return t
    out = t.to(collective_device(dist.get_backend(), t.device, d), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM if op is None else op)
    return out.to(t.device)


def all_reduce_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    return all_reduce(t, d) / d.world_size if d.enabled else t


def git_revision() -> str | None:
    """The package checkout's commit (with "+dirty" for local changes), or None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "modlm"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo's "model name"), else platform.processor():
    speed measurements are only comparable on the same kind of processor."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, dtype: str, d: Dist) -> dict[str, Any]:
    import numpy
    info = {
        "python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device), "dtype": dtype, "world_size": d.world_size,
        "git_revision": git_revision(), "argv": sys.argv,
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _portable(error: BaseException | None) -> BaseException | None:
    """`error` as it can travel to another process: itself when it survives pickling, else a
    RuntimeError with its type and message."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def share_outcome(d: Dist, error: BaseException | None, value: Any = None) -> Any:
    """Every rank learns whether any rank failed: a collective that every rank calls at the same
    point, each with its own error (or None). When one failed, every rank raises the failure of
    the lowest rank that failed (its own exception where that is this rank, a copy with the same
    type and message elsewhere), so all exit with the same error and none waits at a later
    collective for a rank that left. Returns rank 0's `value`. One process: raises `error`."""
    if not d.enabled:
        if error is not None:
            raise error
        return value
    outcomes: list[Any] = [None] * d.world_size
    dist.all_gather_object(outcomes, (_portable(error), value))
    for rank, (failure, _) in enumerate(outcomes):
        if failure is not None:
            if rank == d.rank and error is not None:
                raise error
            raise failure from error
    return outcomes[0][1]


def on_rank_zero(d: Dist, fn: Callable[[], T], *, share: bool = False) -> T | None:
    """`fn()` on rank 0 alone (e.g. what writes the run folder) while the others wait; an error
    it raises is raised on every rank (share_outcome). Returns fn's value on rank 0, and on the
    others too with `share` (it must pickle), else None there."""
    if not d.enabled:
        return fn()
    value, error = None, None
    if d.is_main:
        try:
            value = fn()
        except (Exception, KeyboardInterrupt) as e:
            error = e
    shared = share_outcome(d, error, value if share else None)
    return value if d.is_main else shared


@contextlib.contextmanager
def rank_zero_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. tokenizes and fills a cache), then the others. An error
    in the block is raised on every rank (share_outcome): rank 0's before the others start
    theirs, another rank's once they are done, so no rank waits for one that left."""
    if not d.enabled:
        yield
        return
    if not d.is_main:
        share_outcome(d, None)          # rank 0's outcome (raises its error here)
    error = None
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        error = e
    share_outcome(d, error)             # rank 0: its own; the others: theirs
    if d.is_main:
        share_outcome(d, None)          # the others' outcomes
