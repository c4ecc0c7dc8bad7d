"""The generation engine: batched prefill, token-by-token decode with a KV cache that skips tokens.

Legend: B batch (live rows), T time, D model width, H heads, Dh head width, C cache slots,
K routed tokens, N rows processed by a routed layer in one decode step, V vocabulary, R Dh / 2.

Paper Sec 3.5: top-k routing is not causal, so generation routes each token alone, in one of the
two causal modes the model was trained for: "router" (sigmoid(r) > 0.5, needs the auxiliary BCE
loss) or "predictor" (the stop-gradient predictor's logit > 0). "topk" is refused. Because a
token's decision depends only on its own residual, prefill + incremental decode computes what
`model(ids, mode=mode)` computes over the whole sequence (tests check every logit in float32, to
1e-5; in bfloat16 different kernels round differently, so a decision near its threshold may flip).

The engine drives any `Backbone` (a `MoDLM`, or a retrofitted Hugging Face model) layer by layer
through `modlm.block.DecoderLayer` (project the tokens to queries, keys and values at their
positions; attend over the layer's cache; finish the layer), takes routing decisions from
`RoutedLayer.causal_decision`, and applies Eq. 1 with `routing.routed_update`, the same functions
the full-sequence forward uses; it does the attention itself, because it keeps the keys and values:

- Prefill takes right-padded prompts of different lengths. Dense blocks run causally over the
  padded batch (a valid token never attends to the padding after it); routed blocks route only
  valid tokens (padding is masked out of the decision), gather each row's routed tokens with
  `routing.indices_from_mask` and write them to the cache with their true positions.
- Caches: a dense block's `LayerCache` holds every token of each row; a routed block's holds only
  the tokens routed into it, per row (`n_B` differs across rows), keys rotated at their true
  positions, slots padded and masked out in attention. Routed caches start at the prefill's
  largest count plus a little headroom and grow by doubling, so their memory follows the routing.
- Decode: one new token per row. Dense blocks append and attend with a per-row length mask. A
  routed block decides for each row's new token; only the routed rows are gathered, attend over
  their own routed cache and get x + w * f(x) scattered back; the others skip the block, and a
  step in which no row routes does no work in that block at all.
- Finished rows leave the batch (their cache rows are dropped), so later steps spend nothing on
  them.
- Compiled (`Engine(model, mode, compile=True)`, opt-in): the whole decode step is one
  `torch.compile` graph over caches of fixed size (static.py); it generates the eager engine's
  tokens (tested), after a compile of about 10-30 s on 2 CPU cores.

Context rule: a row's prompt plus its new tokens may not exceed `max_seq_len` (the rotary table
and the full forward stop there), or a sliding-window model's window. `generate` refuses a
request that could cross it, unless `truncate=True`, in which case each row stops at the context
with finish reason "context".

The package holds one idea per module; every name below is importable from `modlm.generate`:
- `engine`: `Engine` (request checks, prefill, decode step, generate / stream and their text
  forms, stop rules and accounting), the `Backbone` protocol it drives, `GENERATION_MODES`.
- `cache`: `LayerCache` (one block's keys and values per row), `DecodeState` (what a decode step
  carries) and attention of new queries over a cache.
- `static`: `StaticStep`, the decode step with static shapes that `Engine(model,
  compile=True)` runs as one `torch.compile` graph (decisions and skips inside the graph).
- `sampling`: `sample_next`, the next token from logits (greedy, temperature, top-k, top-p,
  one generator per row).
- `results`: `StepTokens`, `GenerationResult`, `TextGeneration`, `GenerationStream`,
  `TextStream`, `FINISH_REASONS`.
- `errors`: `GenerationError`.
"""

from __future__ import annotations

from modlm.generate.cache import DecodeState, LayerCache
from modlm.generate.engine import GENERATION_MODES, Backbone, Engine
from modlm.generate.errors import GenerationError
from modlm.generate.results import (
    FINISH_REASONS,
    GenerationResult,
    GenerationStream,
    StepTokens,
    TextGeneration,
    TextStream,
)
from modlm.generate.sampling import sample_next
from modlm.generate.static import StaticStep

__all__ = [
    "FINISH_REASONS",
    "GENERATION_MODES",
    "Backbone",
    "DecodeState",
    "Engine",
    "GenerationError",
    "GenerationResult",
    "GenerationStream",
    "LayerCache",
    "StaticStep",
    "StepTokens",
    "TextGeneration",
    "TextStream",
    "sample_next",
]
