"""Exported model folders that stock transformers clients load: the `trust_remote_code` shim.

transformers loads an architecture it does not ship through `auto_map` in the folder's
config.json, which names a Python file in the folder and the classes in it ("modeling_modlm.
ModLMForCausalLM"); `from_pretrained(folder, trust_remote_code=True)` imports that file. The file
`make_remote_loadable` writes is a shim: it only imports the classes from the installed package
(`pip install 'modlm[hf]'`), so a folder carries no copy of modlm's code that could drift from the
package, and tools that build models from a folder name alone load it with no Python written by
the user, e.g. lm-evaluation-harness:

    lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True --tasks ...

`register()` (modlm.hf) keeps working as before, without trust_remote_code: with the classes
registered, transformers uses the registration and never reads the shim.

How transformers 5.24 treats the shim (transformers/dynamic_module_utils.py):
- `get_class_from_dynamic_module` -> `get_cached_module_file` copies the folder's file into
  HF_MODULES_CACHE (~/.cache/huggingface/modules/transformers_modules/<folder name>/<hash of the
  folder's source files>/modeling_modlm.py) and imports it from there. For a local folder nothing
  is downloaded, so HF_HUB_OFFLINE=1 changes nothing. The shim has no relative imports, so the
  cached copy stands alone, and the classes it hands back are the installed package's own:
  `type(model) is modlm.hf.modeling.ModLMForCausalLM`, as after `register()`.
- `check_imports` first imports every top-level package the file imports outside a `try` block
  and, if one is missing, says `pip install <name>`. The shim imports inside a `try` so the error
  names modlm's install command (`pip install 'modlm[hf]'`) instead.
- Loading through the remote code marks the classes (`register_for_auto_class` sets
  `_auto_class` on them, for the rest of the process). A later `save_pretrained` of such a class
  then copies its source file (for modlm: all of modlm/hf/modeling.py) into the folder and points
  auto_map at that copy, whose classes are then separate copies of modlm's (checked with
  transformers 5.24: `model.save_pretrained(dir)` of a remote-loaded model does this).
  `export_checkpoint` saves under `installed_classes_only`, so an export holds the shim alone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from modlm.atomic import FolderLock, write_json, write_text

SHIM_NAME = "modeling_modlm"      # the module file make_remote_loadable writes (.py)

_SHIM = '''"""Loads this folder's model with transformers' `trust_remote_code=True`.

Written by modlm's export. No model code is in this folder: this file only imports the classes
from the installed `{package}` package ({install}). With it installed, and no other code:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = {model_auto_class}.from_pretrained(FOLDER, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)

or `lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True ...`. Without
trust_remote_code: `import modlm.hf; modlm.hf.register()` first.
"""

try:
    from {source_module} import {config_class}, {model_class}
except ImportError as error:
    raise ImportError("this model folder's classes live in the `{package}` package: "
                      "{install}") from error

__all__ = ["{config_class}", "{model_class}"]
'''


def make_remote_loadable(out_dir: str | os.PathLike[str], *, config_class: str = "ModLMConfig",
                         model_class: str = "ModLMForCausalLM",
                         source_module: str = "modlm.hf.modeling",
                         model_auto_class: str = "AutoModelForCausalLM",
                         module_name: str = SHIM_NAME,
                         install: str = "pip install 'modlm[hf]'") -> Path:
    """Make a saved transformers folder load with `trust_remote_code=True`; returns the shim.

    out_dir: a folder `save_pretrained` wrote (its config.json is required). Writes
    `<module_name>.py`, which imports `config_class` and `model_class` from `source_module`, and
    sets config.json's auto_map entries "AutoConfig" and `model_auto_class` to it (other auto_map
    entries stay); both files are replaced atomically, so running it again is harmless. The
    classes are checked now: `source_module` must import and hold both, and config_class's
    model_type must be config.json's.
    """
    out = Path(out_dir)
    config_file = out / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: save the model "
                                f"(save_pretrained) before making it remote-loadable")
    for what, name in (("module_name", module_name), ("config_class", config_class),
                       ("model_class", model_class), ("model_auto_class", model_auto_class)):
        # transformers splits an auto_map entry once at its dot: "module.Class".
        if not name.isidentifier():
            raise ValueError(f"{what} must be a Python identifier (no dots), got {name!r}")
    if not all(part.isidentifier() for part in source_module.split(".")):
        raise ValueError(f"source_module must be a dotted module name, got {source_module!r}")
    module = importlib.import_module(source_module)
    missing = [c for c in (config_class, model_class) if not hasattr(module, c)]
    if missing:
        raise ValueError(f"{source_module} has no {', '.join(missing)}")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    expected = getattr(getattr(module, config_class), "model_type", None)
    if expected and config.get("model_type") != expected:
        raise ValueError(f"{config_file} has model_type {config.get('model_type')!r}, but "
                         f"{source_module}.{config_class} is {expected!r}")
    shim = out / f"{module_name}.py"
    write_text(shim, _SHIM.format(package=source_module.split(".")[0], install=install,
                                  source_module=source_module, config_class=config_class,
                                  model_class=model_class, model_auto_class=model_auto_class))
    config["auto_map"] = {**(config.get("auto_map") or {}),
                          "AutoConfig": f"{module_name}.{config_class}",
                          model_auto_class: f"{module_name}.{model_class}"}
    write_json(config_file, config)
    return shim


@contextlib.contextmanager
def installed_classes_only(*classes: type) -> Iterator[None]:
    """While saving: `save_pretrained` writes no copy of these classes' source files.

    Loading any folder through remote code marks the classes for the rest of the process
    (`_auto_class`, module docstring), after which `save_pretrained` would copy their module file
    into the folder; this unmarks them for the block and restores the marks after it. Not
    thread-safe (the marks are class attributes).
    """
    missing = object()
    saved = [(c, c.__dict__.get("_auto_class", missing)) for c in classes]
    try:
        for c, _ in saved:
            c._auto_class = None   # type: ignore[attr-defined]
        yield
    finally:
        for c, value in saved:
            if value is missing:
                with contextlib.suppress(AttributeError):
                    delattr(c, "_auto_class")
            else:
                c._auto_class = value   # type: ignore[attr-defined]


# ---- where an export may go ---------------------------------------------------------------------

# What a run's checkpoints/ folder holds: checkpoints, damaged ones set aside, debris of saves.
_CHECKPOINT_ENTRY = re.compile(r"^(step_\d{8,}|damaged-step_\d{8,}|\.step_\d{8,}\..*)$")


def _entries(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:             # not a folder, or not readable: nothing modlm wrote
        return []


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def modlm_folder(folder: Path) -> str | None:
    """What `folder` is to modlm: "a checkpoint folder", "a run's checkpoints/ folder" or "a run
    folder" (also one a trainer has just locked and not yet filled), or None. Decided from
    markers no other tool's folder has together, so that an unrelated `checkpoints/` or
    `meta.json` (in a project folder, say) does not count."""
    names = set(_entries(folder))
    if not names:
        return None
    if "meta.json" in names and (folder.name.startswith(("step_", "damaged-step_"))
                                 or folder.parent.name == "checkpoints"):
        return "a checkpoint folder"
    if folder.name == "checkpoints" and any(_CHECKPOINT_ENTRY.match(n) for n in names):
        return "a run's checkpoints/ folder"
    if "checkpoints" in names and any(_CHECKPOINT_ENTRY.match(n)
                                      for n in _entries(folder / "checkpoints")):
        return "a run folder"
    if "config.json" in names and names & {"metrics.jsonl", "env.json"}:
        return "a run folder"
    if FolderLock.NAME in names:
        try:
            holder = (folder / FolderLock.NAME).read_text(encoding="utf-8", errors="replace")
        except OSError:
            holder = ""
        if holder.startswith("pid "):   # FolderLock's record: a trainer's run folder
            return "a run folder"
    return None


def check_export_target(out_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str],
                        overwrite: bool = False) -> None:
    """Refuse (CheckpointError, before anything is written) an export target that is a file,
    that holds the checkpoint being exported, that is or lies anywhere inside a modlm run folder,
    a run's checkpoints/ folder or a checkpoint folder (RUN/new/sub would write into the run;
    even with `overwrite`), that is not empty unless `overwrite`, or, with `overwrite`, that
    holds a run or checkpoint folder at any depth (replacing it would delete that)."""
    from modlm.checkpoint import CheckpointError
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export target {out} is a file; give a new or empty folder")
    target, source = out.resolve(), Path(checkpoint).resolve()
    if target == source or target in source.parents:
        raise CheckpointError(f"export target {out} holds the checkpoint being exported "
                              f"({checkpoint}); give a new or empty folder outside the run")
    for folder in (target, *target.parents):
        kind = modlm_folder(folder)
        if kind is None and folder == target and (
                _is_file(folder / "meta.json") or (folder / "checkpoints").is_dir()
                or (_is_file(folder / "config.json") and _is_file(folder / "metrics.jsonl"))):
            kind = "a run or checkpoint folder"     # the target itself: looser markers
        if kind is not None:
            where = "is" if folder == target else f"is inside {folder}, which is"
            raise CheckpointError(f"export target {out} {where} {kind}; exports never write into "
                                  f"a modlm run or checkpoint folder (even with --overwrite): "
                                  f"give a new or empty folder outside it")
    if not out.is_dir() or not _entries(out):
        return
    if not overwrite:
        raise CheckpointError(f"export target {out} is not empty; give a new or empty folder, "
                              f"or pass --overwrite to replace what is there (replaced only once "
                              f"the new export is complete)")
    for below, _, _ in os.walk(target):
        kind = modlm_folder(Path(below))
        if kind is not None:
            raise CheckpointError(f"export target {out} holds {below}, which is {kind}; "
                                  f"--overwrite would delete it with the rest: give a new or "
                                  f"empty folder")
