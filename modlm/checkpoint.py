"""Checkpoints: one folder per saved step, written atomically, verified before anything is loaded.

Layout of a run folder:

    RUN_DIR/checkpoints/
        step_00000100/            one complete checkpoint (the step, zero-padded to 8 digits)
            model.safetensors     model weights; a tied duplicate (lm_head.weight = embed.weight)
                                  is stored once and listed under "tied_weights" in meta.json
            state.pt              {"format_version", "optimizer", "trainer"}: optimizer state_dict
                                  and the trainer's dict (step, tokens, flops, scheduler, RNG
                                  states, sampler state), plain data and tensors only
            config.json           {"model": ModelConfig.to_dict(), **run_config}
            tokenizer/            Tokenizer.save(); rebuilt offline by load_tokenizer
            meta.json             written last: step, val_loss, model config hash, tokenizer
                                  identity, size and sha256 of every other file, format version,
                                  creation time, tied weights
        step_00000200/
        best.json                 the checkpoint with the lowest val_loss (for people and tools)

Guarantees:
- Atomic saves. Everything is written into a hidden sibling `.step_XXXXXXXX.tmp-<pid>`, each file
  and folder fsynced, then renamed into place and the parent fsynced. A crash at any moment leaves
  every earlier checkpoint intact; a re-save of an existing step moves the old folder aside first
  and deletes it only after the new one is in place (a crash between those two renames leaves it
  aside, and the next save puts it back). Loaders see only `step_*` folders holding meta.json, so
  leftovers are invisible to them; the next save removes them. One writer per run folder.
- Pruning keeps the newest `keep_last` checkpoints, the one just saved, and the one with the
  lowest val_loss, which is never deleted while it is the best. Pruned folders are renamed away
  before deletion so a half-deleted folder never looks complete.
- Verified loads. Sizes and sha256 of every file are checked against meta.json before parsing;
  a truncated or corrupt file, a different architecture or a different tokenizer raises
  `CheckpointError` naming the file or fields and the other checkpoints that are available.
- Loading never writes, moves or deletes anything, and never runs code from the checkpoint:
  state.pt is read only with `torch.load(weights_only=True)`, weights with safetensors. To make
  that possible `save_checkpoint` refuses state that would not load that way (numpy arrays, custom
  objects), naming where it is, before anything is written.

`latest_checkpoint` is the highest step. Resuming from an earlier checkpoint while later ones
exist leaves those later ones in place (and latest) until pruning removes them.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import shutil
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modlm import atomic, untrusted
from modlm.config import ModelConfig
from modlm.model import MoDLM
from modlm.tokenizer import Tokenizer, TokenizerError, load_tokenizer

FORMAT_VERSION = 1
CHECKPOINTS_DIRNAME = "checkpoints"
MODEL_FILENAME = "model.safetensors"
STATE_FILENAME = "state.pt"
CONFIG_FILENAME = "config.json"
TOKENIZER_DIRNAME = "tokenizer"
META_FILENAME = "meta.json"
BEST_FILENAME = "best.json"

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# Debris of interrupted saves: `.step_XXXXXXXX.tmp-<pid>` (being written), `.old-<pid>` (moved
# aside by a re-save), `.del-<pid>` (being pruned).
_DEBRIS_DIR = re.compile(r"^\.(step_\d{8,})\.(tmp|old|del)-(\d+)$")
_HASH_CHUNK = 1 << 20

Which = Literal["latest", "best"]


class CheckpointError(ValueError):
    """A checkpoint cannot be saved, found, verified or loaded; the message says what and why."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files fail verification (missing, truncated, corrupt, unreadable)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint as listed from its meta.json."""

    path: Path
    step: int
    val_loss: float | None
    created: str | None


@dataclass(frozen=True, eq=False)
class LoadedCheckpoint:
    """Everything a verified checkpoint holds. `state` is None when loaded with load_state=False."""

    path: Path
    step: int
    model_cfg: ModelConfig
    run_config: dict[str, Any]         # config.json without its "model" section
    tokenizer: Tokenizer
    model_state: dict[str, Tensor]     # tied entries are the same tensor object
    state: dict[str, Any] | None       # {"format_version", "optimizer", "trainer"}
    meta: dict[str, Any]
    val_loss: float | None

    @property
    def optimizer_state(self) -> Any:
        return None if self.state is None else self.state["optimizer"]

    @property
    def trainer_state(self) -> dict[str, Any] | None:
        return None if self.state is None else self.state["trainer"]


# ---- naming and hashing ------------------------------------------------------------------------

def checkpoint_dirname(step: int) -> str:
    return f"step_{step:08d}"


def model_config_hash(cfg: ModelConfig) -> str:
    """sha256 of the model config's canonical JSON (sorted keys, no whitespace)."""
    return _dict_hash(cfg.to_dict())


def _dict_hash(d: Mapping[str, Any]) -> str:
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


# ---- listing and resolving ---------------------------------------------------------------------

def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """The complete checkpoints of a run (step_* folders holding meta.json), sorted by step."""
    return _scan(Path(run_dir) / CHECKPOINTS_DIRNAME)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    infos = list_checkpoints(run_dir)
    return infos[-1].path if infos else None


def best_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the lowest val_loss (the earliest on a tie); None if none records one."""
    best = _pick_best(list_checkpoints(run_dir))
    return best.path if best else None


def _scan(root: Path) -> list[CheckpointInfo]:
    if not root.is_dir():
        return []
    infos = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if not m or not (child / META_FILENAME).is_file():
            continue
        try:
            meta = untrusted.read_json(child / META_FILENAME)
            step = meta["step"]
        except (ValueError, KeyError, TypeError) as e:   # UntrustedFileError is a ValueError
            warnings.warn(f"ignoring checkpoint {child}: unreadable {META_FILENAME} ({e})",
                          stacklevel=3)
            continue
        if step != int(m.group(1)):
            warnings.warn(f"ignoring checkpoint {child}: its {META_FILENAME} says step {step}",
                          stacklevel=3)
            continue
        infos.append(CheckpointInfo(child, step, meta.get("val_loss"), meta.get("created")))
    return sorted(infos, key=lambda i: i.step)


def _pick_best(infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    scored = [i for i in infos
              if isinstance(i.val_loss, (int, float)) and math.isfinite(i.val_loss)]
    return min(scored, key=lambda i: (i.val_loss, i.step)) if scored else None


def resolve_checkpoint(path: str | os.PathLike[str], which: Which = "latest") -> Path:
    """The checkpoint folder meant by `path`: a checkpoint folder itself, or the latest (or best,
    with which="best") checkpoint of a run folder or of its checkpoints/ folder."""
    if which not in ("latest", "best"):
        raise CheckpointError(f"which must be 'latest' or 'best', got {which!r}")
    path = Path(path)
    expected = (f"expected a run folder holding {CHECKPOINTS_DIRNAME}/, a {CHECKPOINTS_DIRNAME}/ "
                f"folder holding step_XXXXXXXX/ folders, or a checkpoint folder holding "
                f"{META_FILENAME}")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist; {expected}")
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: it is a file; {expected}")
    if (path / META_FILENAME).is_file():
        return path
    root = path / CHECKPOINTS_DIRNAME if (path / CHECKPOINTS_DIRNAME).is_dir() else path
    infos = _scan(root)
    if not infos:
        debris = sorted(c.name for c in root.iterdir()
                        if _DEBRIS_DIR.match(c.name) or _STEP_DIR.match(c.name))
        found = (f"; found only incomplete or interrupted saves: {debris}" if debris else "")
        raise CheckpointError(f"no complete checkpoint in {root}{found}; {expected}")
    if which == "best":
        best = _pick_best(infos)
        if best is None:
            raise CheckpointError(f"no checkpoint in {root} records a val_loss, so none is best; "
                                  f"use which='latest' (step {infos[-1].step})")
        return best.path
    return infos[-1].path


# ---- saving ------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | os.PathLike[str], *, step: int, model: nn.Module,
                    optimizer_state: Mapping[str, Any] | None,
                    trainer_state: Mapping[str, Any], model_cfg: ModelConfig,
                    tokenizer: Tokenizer, run_config: Mapping[str, Any] | None = None,
                    val_loss: float | None = None, keep_last: int | None = 3,
                    model_state: Mapping[str, Tensor] | None = None) -> Path:
    """Atomically write checkpoint `step` of `model` into RUN_DIR/checkpoints/ and prune old ones.

    optimizer_state: `optimizer.state_dict()` (or None); trainer_state: the trainer's dict (step,
    tokens, flops, scheduler, RNG states, sampler state). Both may hold only tensors, numbers,
    strings, bytes, None and lists/tuples/sets/dicts of them. run_config: extra JSON sections for
    config.json (e.g. {"train": ..., "data": ...}). val_loss: recorded for best-checkpoint
    selection; a non-finite value is recorded as null. keep_last: how many of the newest
    checkpoints to keep besides the best and the one just saved; None keeps all.
    model_state: the full weights when `model.state_dict()` would not give them (a sharded
    FSDP model: pass the gathered full state dict). Returns the checkpoint folder.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step must be a non-negative integer, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool)
                                  or keep_last < 1):
        raise CheckpointError(f"keep_last must be a positive integer or None, got {keep_last!r}")
    if isinstance(trainer_state, Mapping) and "step" in trainer_state \
            and trainer_state["step"] != step:
        raise CheckpointError(f"trainer_state['step'] is {trainer_state['step']} but the "
                              f"checkpoint is for step {step}")
    state = {"format_version": FORMAT_VERSION, "optimizer": optimizer_state,
             "trainer": trainer_state}
    _check_plain(optimizer_state, "optimizer_state")
    _check_plain(trainer_state, "trainer_state")
    model = _unwrap(model)
    model_cfg_of_model = getattr(model, "cfg", None)
    if isinstance(model_cfg_of_model, ModelConfig) and model_cfg_of_model != model_cfg:
        raise CheckpointError("model.cfg differs from model_cfg: "
                              + _describe_diff(model_cfg_of_model.to_dict(), model_cfg.to_dict(),
                                               "model", "model_cfg"))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer.identity} has {tokenizer.vocab_size} ids but "
                              f"the model's vocab_size is {model_cfg.vocab_size}")
    config_text = _config_json(model_cfg, run_config)
    loss = _finite_or_none(val_loss)
    tensors, tied = _split_tied(model.state_dict() if model_state is None else model_state)

    root = Path(run_dir) / CHECKPOINTS_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    _clean_debris(root)
    name = checkpoint_dirname(step)
    final = root / name
    pid = os.getpid()
    tmp = root / f".{name}.tmp-{pid}"
    try:
        tmp.mkdir()
        _write_model(tmp / MODEL_FILENAME, tensors, tied)
        with open(tmp / STATE_FILENAME, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _write_text(tmp / CONFIG_FILENAME, config_text)
        tokenizer.save(tmp / TOKENIZER_DIRNAME)
        atomic.fsync_tree(tmp / TOKENIZER_DIRNAME)
        # safetensors and mkstemp create files 0600; give every file the umask-respecting mode
        # open() gave config.json, so whoever may read the run folder may read its checkpoints.
        mode = stat.S_IMODE((tmp / CONFIG_FILENAME).stat().st_mode)
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, mode)
        files = {p.relative_to(tmp).as_posix(): _file_digest(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "val_loss": loss,
            "model_config_hash": model_config_hash(model_cfg),
            "tokenizer_identity": tokenizer.identity,
            "tied_weights": tied,
            "files": files,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        }
        _write_text(tmp / META_FILENAME, json.dumps(meta, indent=2, sort_keys=True))
        atomic.fsync_dir(tmp)
        _commit(tmp, final, root / f".{name}.old-{pid}")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise CheckpointError(f"saving checkpoint step {step} into {root} failed ({e!r}); "
                                  f"the earlier checkpoints are untouched") from e
        raise
    try:
        _prune(root, keep_last, step)
    except OSError as e:
        warnings.warn(f"checkpoint {final} saved, but pruning old checkpoints failed: {e!r}",
                      stacklevel=2)
    return final


def _commit(tmp: Path, final: Path, aside: Path) -> None:
    """Rename the finished temp folder into place, replacing an existing one only once it is."""
    replacing = final.exists()
    if replacing:
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if replacing:
            os.rename(aside, final)
        raise
    atomic.fsync_dir(final.parent)
    if replacing:
        shutil.rmtree(aside, ignore_errors=True)   # what is left, the next save removes


def _prune(root: Path, keep_last: int | None, saved_step: int) -> None:
    infos = _scan(root)
    best = _pick_best(infos)
    _write_best(root, best)
    keep = {saved_step} | ({best.step} if best else set())
    keep |= {i.step for i in (infos if keep_last is None else infos[-keep_last:])}
    removed = False
    for info in infos:
        if info.step not in keep:
            # Renamed first: a crash mid-delete must not leave a step_* folder with a meta.json.
            doomed = root / f".{info.path.name}.del-{os.getpid()}"
            os.rename(info.path, doomed)
            removed = True
            shutil.rmtree(doomed)
    if removed:
        atomic.fsync_dir(root)


def _write_best(root: Path, best: CheckpointInfo | None) -> None:
    path = root / BEST_FILENAME
    if best is None:
        path.unlink(missing_ok=True)
        return
    atomic.write_json(path, {"step": best.step, "path": best.path.name,
                             "val_loss": best.val_loss,
                             "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _clean_debris(root: Path) -> None:
    """Remove what interrupted saves left behind; put back a checkpoint a re-save moved aside."""
    for child in root.iterdir():
        if child.name.startswith(f".{BEST_FILENAME}.tmp-"):
            child.unlink(missing_ok=True)
            continue
        m = _DEBRIS_DIR.match(child.name)
        if not m or _pid_alive(int(m.group(3))):
            continue
        name, kind = m.group(1), m.group(2)
        if kind == "old" and not (root / name).exists():
            os.rename(child, root / name)   # crash between the two renames of a re-save
        else:
            shutil.rmtree(child, ignore_errors=True)
    atomic.fsync_dir(root)


def _pid_alive(pid: int) -> bool:
    """Whether another live process on this machine may still be writing (saves are sequential
    within one process, so our own pid's leftovers are always stale)."""
    if pid == os.getpid() or os.name == "nt":
        return False
    try:
        os.kill(pid, 0)   # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile (`_orig_mod`) and (Distributed)DataParallel."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _split_tied(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Contiguous CPU copies of the distinct tensors, and {duplicate name: name it aliases}.

    safetensors refuses tensors that share storage, so a tied weight is stored once.
    """
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"model state entry {name!r} is a {type(t).__name__}, not a "
                                  f"tensor")
        key = None
        if t.numel() > 0:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                   t.stride(), t.dtype)
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return tensors, tied


_PLAIN_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device,
                 torch.Size)
_PLAIN_CONTAINERS = (list, tuple, set, dict, collections.OrderedDict)


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything `torch.load(weights_only=True)` would refuse, naming where it sits.

    Exact types: numpy scalars subclass float and named tuples subclass tuple, and both fail.
    """
    kind = type(value)
    if kind in (Tensor, nn.Parameter) or kind in _PLAIN_LEAVES:
        return
    if kind in _PLAIN_CONTAINERS:
        if isinstance(value, dict):
            for k, v in value.items():
                if type(k) not in (str, int, bool, float, type(None)):
                    raise CheckpointError(f"{where} has a key {k!r} of type {type(k).__name__}; "
                                          f"keys must be strings or numbers")
                _check_plain(v, f"{where}[{k!r}]")
        else:
            for i, v in enumerate(value):
                _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}; {STATE_FILENAME} holds only tensors, "
        f"numbers, strings, bytes, None and lists/tuples/sets/dicts of them, so that it loads "
        f"with torch.load(weights_only=True). Convert it (torch.from_numpy(a), float(x), "
        f"dict(obj.__dict__)) before saving")


def _config_json(model_cfg: ModelConfig, run_config: Mapping[str, Any] | None) -> str:
    model_dict = model_cfg.to_dict()
    extra = dict(run_config or {})
    if "model" in extra:
        if _json_normal(extra["model"]) != _json_normal(model_dict):
            raise CheckpointError("run_config['model'] differs from model_cfg; pass the model "
                                  "config only as model_cfg")
        del extra["model"]
    try:
        return json.dumps({"model": model_dict, **extra}, indent=2, sort_keys=True,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"run_config is not plain JSON ({e}); pass dicts of strings, "
                              f"numbers, booleans, null and lists") from None


def _json_normal(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):
        return value


def _finite_or_none(val_loss: Any) -> float | None:
    if val_loss is None:
        return None
    try:
        value = float(val_loss)
    except (TypeError, ValueError):
        raise CheckpointError(f"val_loss must be a number or None, got {val_loss!r}") from None
    return value if math.isfinite(value) else None


def _write_model(path: Path, tensors: dict[str, Tensor], tied: dict[str, str]) -> None:
    safetensors_torch = _import_safetensors()
    safetensors_torch.save_file(tensors, path,
                                metadata={"format": "pt", "modlm_tied_weights": json.dumps(tied)})
    atomic.fsync_file(path)


def _write_text(path: Path, text: str) -> None:
    """A plain write inside the checkpoint's temporary folder (the folder rename is atomic)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _import_safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError("checkpoints store weights with `safetensors`, which is not "
                              "installed; run `pip install safetensors`") from None
    return safetensors.torch


# ---- loading -----------------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike[str], *,
                    expected_model_cfg: ModelConfig | None = None,
                    expected_tokenizer_identity: str | None = None,
                    load_state: bool = True) -> LoadedCheckpoint:
    """Verify and load a checkpoint (a checkpoint folder, or a run's latest; see
    `resolve_checkpoint`). Tensors land on the CPU. With load_state=False state.pt is neither
    verified nor read (enough for inference). Never writes anything."""
    ckpt = resolve_checkpoint(path)
    try:
        untrusted.no_links_outside(ckpt, f"checkpoint {ckpt}")
    except untrusted.UntrustedFileError as e:
        raise _damaged(ckpt, str(e)) from None
    meta = _read_meta(ckpt)
    files = meta["files"]
    required = [CONFIG_FILENAME, MODEL_FILENAME] + ([STATE_FILENAME] if load_state else [])
    missing = [f for f in required if f not in files]
    if missing:
        raise _damaged(ckpt, f"{META_FILENAME} lists no {missing}")

    _verify(ckpt, CONFIG_FILENAME, files)
    try:
        config = untrusted.read_json(ckpt / CONFIG_FILENAME)
        model_cfg = ModelConfig.from_dict(config["model"])
    except (ValueError, KeyError, TypeError) as e:   # ConfigError is a ValueError
        raise _damaged(ckpt, f"{CONFIG_FILENAME} does not describe a model ({e})",
                       files_bad=False) from None
    if _dict_hash(config["model"]) != meta.get("model_config_hash"):
        raise _damaged(ckpt, f"the model config in {CONFIG_FILENAME} does not match the hash in "
                             f"{META_FILENAME}")
    if expected_model_cfg is not None and expected_model_cfg != model_cfg:
        raise CheckpointError(
            f"checkpoint {ckpt} holds a different architecture: "
            + _describe_diff(model_cfg.to_dict(), expected_model_cfg.to_dict(), "checkpoint",
                             "expected"))

    for rel in sorted(f for f in files if f.startswith(TOKENIZER_DIRNAME + "/")):
        _verify(ckpt, rel, files)
    try:
        tokenizer = load_tokenizer(ckpt / TOKENIZER_DIRNAME)
    except TokenizerError as e:
        raise _damaged(ckpt, f"its {TOKENIZER_DIRNAME}/ cannot be loaded ({e})",
                       files_bad=False) from None
    if tokenizer.identity != meta.get("tokenizer_identity"):
        raise _damaged(ckpt, f"its tokenizer is {tokenizer.identity!r} but {META_FILENAME} "
                             f"records {meta.get('tokenizer_identity')!r}")
    if expected_tokenizer_identity is not None \
            and tokenizer.identity != expected_tokenizer_identity:
        raise CheckpointError(f"checkpoint {ckpt} was trained with tokenizer "
                              f"{tokenizer.identity!r}, expected {expected_tokenizer_identity!r}; "
                              f"its token ids mean different text")

    model_state = _load_model_state(ckpt, meta)
    state = _load_state(ckpt, files) if load_state else None
    return LoadedCheckpoint(
        path=ckpt, step=meta["step"], model_cfg=model_cfg,
        run_config={k: v for k, v in config.items() if k != "model"}, tokenizer=tokenizer,
        model_state=model_state, state=state, meta=meta, val_loss=meta.get("val_loss"))


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
               expected_model_cfg: ModelConfig | None = None,
               expected_tokenizer_identity: str | None = None
               ) -> tuple[MoDLM, LoadedCheckpoint]:
    """A MoDLM built from a checkpoint's config with its weights (strict), on `device`, in eval
    mode, for inference: the optimizer and trainer state are not loaded. A run trained from a
    retrofitted Hugging Face decoder (its config records `retrofit.hf_config`) gives a
    `modlm.hf.retrofit.RetrofitLM` with the same forward contract."""
    loaded = load_checkpoint(path, expected_model_cfg=expected_model_cfg,
                             expected_tokenizer_identity=expected_tokenizer_identity,
                             load_state=False)
    retrofit = loaded.run_config.get("retrofit") or {}
    layer_counts: list[Any] = [loaded.model_cfg.n_layers]
    if retrofit.get("hf_config") is not None:
        from modlm.hf.retrofit import declared_layers, model_from_run_config

        def build() -> nn.Module:
            return model_from_run_config(loaded.model_cfg, retrofit)
        layer_counts += declared_layers(retrofit["hf_config"])
    else:
        def build() -> nn.Module:
            return MoDLM(loaded.model_cfg)
    # Untrusted: the config's shapes must match the weights file before anything is allocated.
    model = untrusted.build_to_fit(
        build, {k: tuple(t.shape) for k, t in loaded.model_state.items()},
        where=f"checkpoint {loaded.path}", layer_counts=layer_counts)
    try:
        model.load_state_dict(loaded.model_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {loaded.path / MODEL_FILENAME} do not fit the "
                              f"model its {CONFIG_FILENAME} describes: {e}") from None
    return model.to(device).eval(), loaded


def _read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = untrusted.read_json(ckpt / META_FILENAME)
    except untrusted.UntrustedFileError as e:
        raise _damaged(ckpt, f"its {META_FILENAME} is unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) \
            or not isinstance(meta.get("step"), int):
        raise _damaged(ckpt, f"its {META_FILENAME} lacks the step or the file list")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt} has format version {version!r}; this modlm "
                              f"reads version {FORMAT_VERSION}")
    return meta


def _verify(ckpt: Path, rel: str, files: Mapping[str, Any]) -> None:
    expected = files[rel]
    if not (isinstance(expected, dict) and isinstance(expected.get("size"), int)
            and isinstance(expected.get("sha256"), str)):
        raise _damaged(ckpt, f"{META_FILENAME} has no size and sha256 for {rel}")
    try:
        path = untrusted.inside(ckpt, rel, META_FILENAME)
    except untrusted.UntrustedFileError as e:
        raise _damaged(ckpt, str(e)) from None
    if not path.is_file():
        raise _damaged(ckpt, f"{rel} is missing")
    size = path.stat().st_size
    if size != expected["size"]:
        what = "truncated" if size < expected["size"] else "corrupt (longer than written)"
        raise _damaged(ckpt, f"{rel} is {what}: {size} bytes, {META_FILENAME} records "
                             f"{expected['size']}")
    if _file_digest(path)["sha256"] != expected["sha256"]:
        raise _damaged(ckpt, f"{rel} is corrupt: its sha256 differs from the one in "
                             f"{META_FILENAME}")


def _load_model_state(ckpt: Path, meta: Mapping[str, Any]) -> dict[str, Tensor]:
    _verify(ckpt, MODEL_FILENAME, meta["files"])
    safetensors_torch = _import_safetensors()
    try:
        tensors = safetensors_torch.load_file(ckpt / MODEL_FILENAME, device="cpu")
    except Exception as e:   # safetensors raises its own SafetensorError, plus OSError
        raise _damaged(ckpt, f"{MODEL_FILENAME} cannot be read by safetensors ({e})") from None
    tied = meta.get("tied_weights") or {}
    for alias, target in tied.items():
        if target not in tensors:
            raise _damaged(ckpt, f"{META_FILENAME} ties {alias!r} to {target!r}, which "
                                 f"{MODEL_FILENAME} lacks")
        tensors[alias] = tensors[target]   # the same tensor: tied again
    return tensors


def _load_state(ckpt: Path, files: Mapping[str, Any]) -> dict[str, Any]:
    _verify(ckpt, STATE_FILENAME, files)
    try:
        # weights_only: tensors and plain data only; any other pickled object is refused unrun.
        state = torch.load(ckpt / STATE_FILENAME, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            culprit = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)",
                                str(e))
            named = f": {culprit.group(1)}" if culprit else ""
            raise CheckpointError(
                f"refusing to load {ckpt / STATE_FILENAME}: it holds pickled objects other than "
                f"tensors and plain data{named}, "
                f"and torch.load(weights_only=True) runs no code to rebuild them. save_checkpoint "
                f"never writes such a file; load it with weights_only=False only if you trust "
                f"where it came from") from None
        raise _damaged(ckpt, f"{STATE_FILENAME} cannot be read by torch.load ({e})",
                       files_bad=False) from None
    if not isinstance(state, dict) or "optimizer" not in state or "trainer" not in state:
        raise _damaged(ckpt, f"{STATE_FILENAME} lacks the optimizer or trainer state")
    return state


def _damaged(ckpt: Path, problem: str, files_bad: bool = True) -> CheckpointError:
    """An error for an unusable checkpoint that points at the others available: a
    DamagedCheckpoint when its files fail verification, a plain CheckpointError when verified
    files cannot be used here (a missing package, another modlm version), which resuming must
    not mistake for damage."""
    with warnings.catch_warnings():   # this checkpoint's own problem is the one to name
        warnings.simplefilter("ignore")
        others = [i for i in reversed(_scan(ckpt.parent)) if i.path.resolve() != ckpt.resolve()]
    if others:
        listed = ", ".join(f"{i.path} (step {i.step})" for i in others)
        hint = (f"pass an earlier checkpoint's folder in place of the run folder (`modlm train "
                f"--resume RUN` falls back to the newest that verifies by itself); available, "
                f"newest first: {listed}")
    else:
        hint = f"no other checkpoint is available in {ckpt.parent}"
    cls = DamagedCheckpoint if files_bad else CheckpointError
    return cls(f"checkpoint {ckpt} is unusable: {problem}; {hint}")


DAMAGED_PREFIX = "damaged-"


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint folder to `damaged-step_XXXXXXXX` (then -2, -3, ...) beside
    it: kept for inspection, no longer a checkpoint (loaders, pruning and re-saves ignore it)."""
    n, target = 1, ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{DAMAGED_PREFIX}{ckpt.name}-{n}")
    os.rename(ckpt, target)
    atomic.fsync_dir(ckpt.parent)
    return target


def load_for_resume(run_dir: str | os.PathLike[str], *,
                    expected_model_cfg: ModelConfig | None = None, set_aside_damaged: bool = True,
                    say: Any = None) -> LoadedCheckpoint | None:
    """The newest checkpoint of a run that verifies, for resuming; None when the run has none.
    A newer checkpoint that fails verification is set aside (`set_aside`, when
    set_aside_damaged) and reported through `say(message)`; one that verifies but does not fit
    (another architecture) raises. Raises when checkpoints exist and none verifies."""
    infos = list_checkpoints(run_dir)
    problems = []
    for info in reversed(infos):
        try:
            return load_checkpoint(info.path, expected_model_cfg=expected_model_cfg)
        except DamagedCheckpoint as e:
            where = set_aside(info.path) if set_aside_damaged else info.path
            problems.append(f"step {info.step}")
            if say is not None:
                say(f"modlm: checkpoint step {info.step} is damaged ({str(e).split('; ')[0]}); "
                    f"kept for inspection as {where}; trying the one before it")
    if infos:
        raise CheckpointError(
            f"no checkpoint of {run_dir} verifies ({', '.join(problems)}; set aside as "
            f"{DAMAGED_PREFIX}step_*); `modlm train --resume {run_dir}` again starts the run "
            f"from step 0 with its recorded config")
    return None


def _describe_diff(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str, b_name: str) -> str:
    fa, fb = _flatten(a), _flatten(b)
    diffs = [f"{k}: {a_name} {_show(fa.get(k))}, {b_name} {_show(fb.get(k))}"
             for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    return "; ".join(diffs) if diffs else "(values equal up to type)"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
