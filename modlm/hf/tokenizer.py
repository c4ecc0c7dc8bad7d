"""modlm tokenizers exported as Hugging Face tokenizers (`AutoTokenizer.from_pretrained(dir)`).

Every kind becomes a transformers fast tokenizer (the `tokenizers` backend), saved with
`save_pretrained` as `tokenizer.json` + `tokenizer_config.json`, which `AutoTokenizer` loads offline
without modlm installed:

- "bytes": a byte-level BPE with no merges over GPT-2's 256-symbol byte alphabet, symbol i at id i,
  no regex split, so `encode(text)` is `list(text.encode("utf-8"))` and decoding replaces invalid
  UTF-8 with U+FFFD exactly as `ByteTokenizer.decode` does.
- "bpe": the run's trained `tokenizer.json` pipeline as is; `<|endoftext|>` (id 0) is the eos and
  pad token.
- "gpt2": GPT-2's vocabulary and merges; `<|endoftext|>` (50256) is the eos and pad token.
- "hf" (a retrofit run's model's own tokenizer): exported as it is, with its own special tokens
  (bos, eos, pad), template and settings; the rest of this docstring is about the three modlm
  kinds. (Training encoded its corpus as plain text, special tokens included, without a bos.)

Special tokens are encoded as plain text, as modlm's tokenizers do (a text that contains
"<|endoftext|>" gets its characters, not the reserved id): the exported tokenizer sets
`split_special_tokens=True`, which transformers saves and restores. So `encode` and `decode` of the
exported tokenizer equal modlm's for every text (tests check all three kinds).

Every exported modlm tokenizer declares an end-of-text token, its eos (and pad) token: evaluation
clients need one, e.g. lm-evaluation-harness feeds it as the first token of a perplexity window (its
`prefix_token_id`: the bos token, else the eos) and stops generation at it. No kind declares a bos
token: modlm never prepends one, and a declared bos would be what such clients feed instead.

Deviation: a byte vocabulary has no free id for an end-of-text or padding token; the "bytes"
tokenizer names byte 0 (NUL, which text practically never holds) its eos and pad token, so
tokenizer-side padding (`padding=True`) works and clients that need an end-of-text id have one.
Padding is always masked out by the attention mask, so what id it carries never reaches the model;
the eos is only declared (encoding never adds it, and a NUL in the text still encodes as byte 0).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from modlm.tokenizer import (
    END_OF_TEXT,
    BPETokenizer,
    ByteTokenizer,
    GPT2Tokenizer,
    PretrainedTokenizer,
    Tokenizer,
    TokenizerError,
)


def to_hf_tokenizer(tokenizer: Tokenizer, *, model_max_length: int | None = None) -> Any:
    """A transformers fast tokenizer that encodes and decodes exactly like `tokenizer` (a
    model's own tokenizer: a copy of it as it is).

    model_max_length: the model's context (max_seq_len), recorded for transformers' truncation.
    """
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, PretrainedTokenizer):
        # A Hugging Face model's own tokenizer is exported as it is (special tokens, template).
        hf = copy.deepcopy(tokenizer.transformers_tokenizer)
        if model_max_length is not None:
            hf.model_max_length = model_max_length
        return hf
    if isinstance(tokenizer, ByteTokenizer):
        backend = _byte_backend(tokenizers)
        # Deviation: byte 0 (NUL) doubles as end-of-text and padding (module docstring).
        nul = _bytes_to_unicode()[0]
        special = {"eos_token": nul, "pad_token": nul}
    elif isinstance(tokenizer, (BPETokenizer, GPT2Tokenizer)):
        # A copy through JSON: the exported tokenizer's settings never touch the run's tokenizer.
        backend = tokenizers.Tokenizer.from_str(tokenizer._hf.to_str())
        if backend.token_to_id(END_OF_TEXT) is None:
            raise TokenizerError(f"the {tokenizer.name!r} tokenizer has no {END_OF_TEXT} token; "
                                 f"it was not built by modlm")
        special = {"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT}
    else:
        raise TokenizerError(f"cannot export a {type(tokenizer).__name__} as a Hugging Face "
                             f"tokenizer; supported: bytes, bpe, gpt2")
    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                 split_special_tokens=True, **special, **kwargs)
    if len(hf) != tokenizer.vocab_size:
        raise TokenizerError(f"the exported tokenizer has {len(hf)} ids but modlm's has "
                             f"{tokenizer.vocab_size}; please report this")
    return hf


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike[str], *,
                      model_max_length: int | None = None) -> Path:
    """Export `tokenizer` into `directory` (created if needed) for `AutoTokenizer`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    to_hf_tokenizer(tokenizer, model_max_length=model_max_length).save_pretrained(directory)
    return directory


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The pad and eos ids the exported tokenizer declares (for the model's config): for modlm's
    kinds one id, the end-of-text token; for a model's own tokenizer its eos, and its pad (the
    eos when it has none)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"pad_token_id": 0, "eos_token_id": 0}   # Deviation: NUL (module docstring)
    if isinstance(tokenizer, (BPETokenizer, GPT2Tokenizer)):
        eot = tokenizer._hf.token_to_id(END_OF_TEXT)
        return {"pad_token_id": eot, "eos_token_id": eot}
    if isinstance(tokenizer, PretrainedTokenizer):
        tok = tokenizer.transformers_tokenizer
        eos = tok.eos_token_id
        return {"pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos,
                "eos_token_id": eos}
    raise TokenizerError(f"unknown tokenizer kind {type(tokenizer).__name__}")


def _byte_backend(tokenizers: Any) -> Any:
    """Bytes as tokens: GPT-2's byte-to-symbol map, symbol of byte i at id i, no merges."""
    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    # No regex split: every byte is its own pre-token symbol and no merge joins them.
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                use_regex=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer and
    decoder use: printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out
