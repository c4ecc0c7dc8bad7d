"""modlm and the Hugging Face ecosystem (optional: `pip install 'modlm[hf]'`).

- `modlm.hf.modeling`: `ModLMConfig` / `ModLMForCausalLM`, a modlm model or a retrofitted Hugging
  Face model as a transformers model (save_pretrained / from_pretrained in safetensors, `generate`
  through modlm's causal routing and its token-skipping KV cache).
- `modlm.hf.retrofit`: a pretrained Hugging Face decoder (Llama family, GPT-2) with MoD routers;
  `modlm.hf.families`: the decoder families it takes and how each backbone is driven;
  `modlm.hf.closeness`: how far a retrofitted model starts from the original.
- `modlm.hf.export`: the shim that lets stock clients load exported folders.
- `modlm.hf.tokenizer`: modlm tokenizers exported as transformers tokenizers.
- `modlm.hf.llama`: the dense modlm model <-> Hugging Face Llama weight mapping and converters.

This package's own functions:
- `register()`: make `AutoConfig` / `AutoModelForCausalLM` know model_type "modlm" (idempotent),
  after which `AutoModelForCausalLM.from_pretrained(folder)` loads an exported model offline,
  without `trust_remote_code`.
- `export_checkpoint(run_or_checkpoint, out_dir)`: a trained run's checkpoint as a folder that
  transformers loads: model (config.json, model.safetensors, generation_config.json), tokenizer
  (tokenizer.json, tokenizer_config.json) and `modeling_modlm.py`, a shim that config.json's
  auto_map names, so stock tools load it with `trust_remote_code=True` (`modlm.hf.export`).

Importing this package loads nothing from transformers; `register()`, `export_checkpoint()` and the
modules above do. `import modlm` never imports it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from modlm import atomic


def require_transformers() -> None:
    """Raise ImportError with the install command unless transformers is installed."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("modlm's Hugging Face integration needs the optional package "
                          "`transformers`: pip install 'modlm[hf]'")


def register() -> None:
    """Register `ModLMConfig` and `ModLMForCausalLM` with transformers' Auto classes (model_type
    "modlm"). Calling it again does nothing new."""
    require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    from modlm.hf.modeling import MODEL_TYPE, ModLMConfig, ModLMForCausalLM

    AutoConfig.register(MODEL_TYPE, ModLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(ModLMConfig, ModLMForCausalLM, exist_ok=True)


def export_checkpoint(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                      which: str = "latest", routing_mode: str | None = None,
                      overwrite: bool = False) -> Path:
    """Write a modlm checkpoint as a transformers model folder and return it (`modlm export-hf`).

    path: a run folder (its latest checkpoint, or the best with which="best") or a checkpoint
    folder, of a modlm model or of a retrofitted Hugging Face model (exported as the patched
    model with its routers: it loads again as a `RetrofitLM` and generates through the skipping
    cache; with the source model's own tokenizer, and its eos in the generation config).
    routing_mode: the causal rule `generate` and evaluation use ("router" or "predictor";
    default: the one the model was trained for). The weights keep their dtype. out_dir must be
    new or empty, or `overwrite` set (never a run or checkpoint folder); the folder is written
    whole and then renamed into place, so an interrupted export changes nothing there.

    The folder loads two ways, offline (HF_HUB_OFFLINE=1 is fine), both needing modlm installed:
    after `modlm.hf.register()`, `AutoModelForCausalLM.from_pretrained(out_dir)`; or with no
    modlm code at all, `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`
    through the `modeling_modlm.py` shim in the folder (`modlm.hf.export.make_remote_loadable`),
    which is how lm-evaluation-harness's stock command line loads it:

        lm_eval --model hf --model_args pretrained=OUT_DIR,trust_remote_code=True \
            --tasks TASKS --device cpu --batch_size 4

    The tokenizer is the folder's own: `AutoTokenizer.from_pretrained(out_dir)` after
    `register()` (without it, AutoTokenizer reads config.json's auto_map and asks on a terminal
    whether to run the shim, waiting up to 15 s, then loads it anyway), or
    `PreTrainedTokenizerFast.from_pretrained(out_dir)`, which reads no config. Its eos token
    (`<|endoftext|>`, byte 0 for byte-level runs, or a retrofitted model's own) is what such tools
    use as the end-of-text and perplexity-prefix token.
    """
    require_transformers()
    from modlm.checkpoint import load_model, resolve_checkpoint
    from modlm.hf.export import check_export_target
    from modlm.hf.modeling import from_modlm
    from modlm.hf.tokenizer import save_hf_tokenizer, special_token_ids
    from modlm.tokenizer import PretrainedTokenizer

    ckpt = resolve_checkpoint(path, which)  # type: ignore[arg-type]
    out = Path(out_dir)
    check_export_target(out, ckpt, overwrite)   # before anything is read or written
    model, loaded = load_model(ckpt)
    # Deviation: no eos_token_id in the model's config (hence its generation config), though the
    # tokenizer declares one: modlm's training text has no end-of-text separators, so generation
    # stops only where asked to (for byte runs the eos is byte 0, which a model may well emit).
    ids = special_token_ids(loaded.tokenizer)
    fields = {"pad_token_id": ids["pad_token_id"]}
    if isinstance(loaded.tokenizer, PretrainedTokenizer):
        # A pretrained model's own tokenizer: the model was trained to end text with its eos.
        fields["eos_token_id"] = ids["eos_token_id"]
    wrapper = from_modlm(model, routing_mode, **fields)
    # Written whole into a hidden sibling and renamed into place: an interrupted export leaves
    # the target as it was.
    with atomic.atomic_folder(out, replace=overwrite) as tmp:
        wrapper.save_pretrained(tmp)      # with the trust_remote_code shim (modlm.hf.export)
        save_hf_tokenizer(loaded.tokenizer, tmp, model_max_length=model.cfg.max_seq_len)
    return out


def __getattr__(name: str) -> Any:
    # `from modlm.hf import ModLMForCausalLM` works, loading transformers only then.
    if name in ("ModLMConfig", "ModLMForCausalLM", "ModLMCache", "from_modlm"):
        require_transformers()
        from modlm.hf import modeling
        return getattr(modeling, name)
    raise AttributeError(f"module 'modlm.hf' has no attribute {name!r}")
