"""Reading folders that may come from someone else: bounded, confined, and never code.

A checkpoint, an exported model or a tokenizer folder can be hostile. What modlm reads from one
goes through these functions, so that loading it
- never runs code (weights are safetensors, state is `torch.load(weights_only=True)`; nothing
  here imports or unpickles);
- never reads outside the folder: every file name a file names is a plain relative name that
  stays inside it, symbolic links included (`inside`);
- never fails with a RecursionError or a parser's panic: JSON is size-capped and depth-checked
  (`read_json`);
- never allocates what the weights file does not justify: the model a config describes is first
  built on the meta device (no memory), and its every parameter's shape is compared with the
  weights file's (`build_to_fit`), before the real model is built.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import nn

MAX_JSON_BYTES = 64 << 20          # a config, meta or tokenizer file; real ones are far smaller
MAX_JSON_DEPTH = 64                # real configs nest a handful of levels
# Tensors a model derives from its config and does not store (rotary tables): allowed beyond
# the weights' own bytes before the config is taken to describe more than the file justifies.
DERIVED_BYTES_ALLOWANCE = 64 << 20

M = TypeVar("M", bound="nn.Module")


class UntrustedFileError(ValueError):
    """A file from a checkpoint, export or tokenizer folder is malformed or reaches beyond its
    folder; the message names the file and the problem."""


def read_json(path: str | os.PathLike[str], what: str = "", *,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file whose size and nesting are bounded; any failure is one
    UntrustedFileError naming the file."""
    path = Path(path)
    label = f"{what} {path}".strip()
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UntrustedFileError(f"{label} is {size:,d} bytes, more than the {max_bytes:,d} "
                                     f"a JSON file of this kind may have; it is not one modlm "
                                     f"or Hugging Face wrote")
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except UntrustedFileError:
        raise
    except RecursionError:
        raise UntrustedFileError(f"{label} nests deeper than JSON parsing allows; it is not a "
                                 f"file modlm or Hugging Face wrote") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UntrustedFileError(f"{label} is not readable JSON ({e})") from None
    depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise UntrustedFileError(f"{label} nests {depth} levels deep (at most {MAX_JSON_DEPTH}); "
                                 f"it is not a file modlm or Hugging Face wrote")
    return value


def json_depth(value: Any) -> int:
    """How deeply lists and dicts nest in a parsed JSON value (a scalar is depth 0), found
    without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = (item.values() if isinstance(item, dict)
                    else item if isinstance(item, list) else None)
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((c, depth + 1) for c in children)
    return deepest


def inside(folder: str | os.PathLike[str], name: Any, what: str) -> Path:
    """`folder / name` for a file name read from a file: refused unless it is a relative name
    without `..` that, links resolved, stays inside `folder`."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise UntrustedFileError(f"{what} names {name!r}, which is not a file name inside "
                                 f"{folder}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise UntrustedFileError(f"{what} names {name!r}, a path outside {folder}; a folder from "
                                 f"someone else may name only its own files")
    path = folder / rel
    try:
        root, resolved = folder.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:   # a symlink loop (RuntimeError before Python 3.13)
        raise UntrustedFileError(f"{what} names {name!r}, which cannot be resolved inside "
                                 f"{folder} ({e})") from None
    if resolved != root and root not in resolved.parents:
        raise UntrustedFileError(f"{what} names {name!r}, a link to {resolved} outside {folder}; "
                                 f"a folder from someone else may name only its own files")
    return path


def no_links_outside(folder: str | os.PathLike[str], what: str) -> None:
    """Refuse a folder any of whose entries is a symbolic link leading outside it."""
    folder = Path(folder)
    for p in folder.rglob("*"):
        if p.is_symlink():
            inside(folder, p.relative_to(folder).as_posix(), what)


# Hugging Face tokenizer files that transformers parses with Python's json, and the keys of
# tokenizer_config.json whose values it opens as files (a vocab_file naming /etc/... is honoured).
HF_TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                     "tokenizer.json")
_FILE_KEY_ENDINGS = ("_file", "_files", "_path", "_dir", "_directory")
_INFORMATIONAL_KEYS = ("name_or_path", "_name_or_path")


def check_hf_tokenizer_files(folder: str | os.PathLike[str]) -> None:
    """Refuse a Hugging Face tokenizer folder whose JSON files are hostile (too large, too deeply
    nested) or whose tokenizer_config.json names files outside the folder."""
    folder = Path(folder)
    for name in HF_TOKENIZER_JSON:
        if (folder / name).is_file():
            value = read_json(folder / name, "tokenizer file")
            if name == "tokenizer_config.json" and isinstance(value, dict):
                for key, item in value.items():
                    if key in _INFORMATIONAL_KEYS or not key.endswith(_FILE_KEY_ENDINGS):
                        continue
                    for file_name in item if isinstance(item, list) else [item]:
                        if file_name is not None:
                            inside(folder, file_name, f"{folder / name} key {key!r}")


def weights_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's header; no tensor is read (safetensors
    bounds the header and checks every tensor's bytes lie inside the file)."""
    try:
        from safetensors import safe_open
        with safe_open(os.fspath(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:   # safetensors' own SafetensorError, OSError
        raise UntrustedFileError(f"{path} is not a readable safetensors file ({e})") from None


def folder_weights_shapes(folder: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a saved model folder's weights, from the headers of model.safetensors
    or of the shards its index names (each inside the folder); {} when it has neither."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    elif index.is_file():
        weight_map = read_json(index, "weights index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise UntrustedFileError(f"{index} has no weight_map")
        shards = [inside(folder, name, str(index)) for name in sorted(set(weight_map.values()))]
    else:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update(weights_shapes(shard))
    return shapes


def meta_probe(build: Callable[[], M], shapes: Mapping[str, tuple[int, ...]], *, where: str,
               layer_counts: Iterable[Any] = ()) -> M:
    """The model `build()` makes, built on the meta device (no memory) for comparing with a
    weights file's `shapes`. Refused first: a declared layer count (`layer_counts`) above the
    number of tensors in the file (a billion layers would take hours to build even on the meta
    device); after: tensors the model derives without storing them (rotary tables) that would
    take more than the weights' own bytes plus DERIVED_BYTES_ALLOWANCE."""
    for n in layer_counts:
        if isinstance(n, int) and n > len(shapes):
            raise UntrustedFileError(f"{where}: the config declares {n:,d} layers but the weights "
                                     f"file holds only {len(shapes):,d} tensors; the config does "
                                     f"not describe these weights")
    import torch
    with torch.device("meta"):
        probe = build()
    state = probe.state_dict()
    stored = sum(t.numel() * t.element_size() for t in state.values())
    derived = sum(b.numel() * b.element_size() for name, b in probe.named_buffers()
                  if name not in state)
    if derived > stored + DERIVED_BYTES_ALLOWANCE:
        raise UntrustedFileError(f"{where}: the config asks for {derived / 2**20:,.0f} MiB of "
                                 f"derived tables (e.g. rotary positions) beside "
                                 f"{stored / 2**20:,.0f} MiB of weights; lower max_seq_len")
    return probe


def build_to_fit(build: Callable[[], M], shapes: Mapping[str, tuple[int, ...]], *,
                 where: str, layer_counts: Iterable[Any] = (),
                 absent_ok: Callable[[M], Iterable[str]] = lambda model: ()) -> M:
    """`build()`, once the model it builds is known to fit the weights exactly: its meta-device
    twin (`meta_probe`) must have the names and shapes of `shapes` (the weights file's; the names
    `absent_ok(model)` gives, such as tied weights, may be missing)."""
    probe = meta_probe(build, shapes, where=where, layer_counts=layer_counts)
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    absent = set(absent_ok(probe))
    missing = sorted(k for k in expected if k not in shapes and k not in absent)
    unexpected = sorted(k for k in shapes if k not in expected)
    mismatched = sorted(f"{k}: file {list(shapes[k])}, config {list(expected[k])}"
                        for k in expected if k in shapes and shapes[k] != expected[k])
    if missing or unexpected or mismatched:
        parts = [f"{label} {_few(names)}" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
                 if names]
        raise UntrustedFileError(f"{where}: the weights do not fit the model its config "
                                 f"describes ({'; '.join(parts)}); nothing was allocated")
    del probe
    return build()


def check_parameter_total(build: Callable[[], Any], shapes: Mapping[str, tuple[int, ...]], *,
                          where: str, layer_counts: Iterable[Any] = ()) -> None:
    """For a loader that maps names itself (transformers renames legacy keys, ties heads): the
    parameters the config describes, counted on the meta device, must not outnumber the weights
    file's values; more would be allocated and randomly initialised."""
    probe = meta_probe(build, shapes, where=where, layer_counts=layer_counts)
    need = sum(p.numel() for p in probe.parameters())
    have = sum(math.prod(shape) for shape in shapes.values())
    if need > have:
        raise UntrustedFileError(f"{where}: the config describes {need:,d} parameters but the "
                                 f"weights hold {have:,d} values; the config does not describe "
                                 f"these weights (nothing was allocated)")


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
