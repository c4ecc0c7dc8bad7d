"""`Engine`: batched generation from a `Backbone` (a `MoDLM`, or a retrofitted Hugging Face
model) in a causal routing mode; the package docstring (`modlm.generate`) has the overview.

Legend: B batch (live rows), T time, D model width, K routed tokens, N rows processed by a routed
layer in one decode step, V vocabulary.

Paper Sec 3.5: generation routes each token alone, in mode "router" or "predictor"; "topk" is not
causal and is refused. The engine checks a request whole before the first token; `prefill` runs
right-padded prompts through the model and fills the caches; `decode_step` feeds one token per
live row, running a routed block only for the rows whose token routes into it; `generate`,
`stream`, `generate_text` and `stream_text` drive the loop, end rows at stop tokens, stop
strings, the length budget or the context, and account for time, routing and cache bytes.
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from modlm import routing
from modlm.block import (
    DecoderLayer,
    PositionEncoding,
    RoutedLayer,
    causal_update,
    decoupled_update,
    finish,
)
from modlm.config import ModelConfig
from modlm.generate.cache import (
    DecodeState,
    LayerCache,
    Rows,
    _attend_cached,
    _bounds,
    _empty_cache,
    _length_mask,
    _on_device,
)
from modlm.generate.errors import GenerationError
from modlm.generate.results import (
    GenerationResult,
    GenerationStream,
    StepTokens,
    TextGeneration,
    TextStream,
)
from modlm.generate.sampling import _check_sampling, _sample
from modlm.generate.static import StaticStep
from modlm.router import AttentionRouter
from modlm.tokenizer import not_unicode

GENERATION_MODES = ("router", "predictor")
# Extra slots a routed cache gets beyond what prefill needed, before its first doubling.
_ROUTED_HEADROOM = 16


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class _TextTokenizer(_Decoder, Protocol):
    def encode(self, text: str) -> list[int]: ...


class Backbone(Protocol):
    """What the engine drives: modlm's `MoDLM` and a retrofitted Hugging Face model
    (`modlm.hf.retrofit.RetrofitLM`) both provide it.

    cfg: the model's `ModelConfig` (vocabulary, routing); context_length: the most tokens a row
    may hold (max_seq_len, or a sliding-window model's window); decoder_layers: in order, each a
    `DecoderLayer` or a `RoutedLayer` around one; embed_tokens / encode_positions / head: token
    ids at positions to hidden states, positions to what `DecoderLayer.project` takes, final
    hidden states to logits.
    """

    cfg: ModelConfig

    @property
    def context_length(self) -> int: ...

    def decoder_layers(self) -> list[DecoderLayer | RoutedLayer]: ...

    def embed_tokens(self, idx_BT: Tensor, pos_BT: Tensor) -> Tensor: ...

    def encode_positions(self, pos: Tensor) -> PositionEncoding: ...

    def head(self, x_BTD: Tensor) -> Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


class Engine:
    """Batched generation from a `Backbone` (a `MoDLM`, or a retrofitted Hugging Face model) in a
    causal routing mode ("router" or "predictor").

    A dense model has no routing; any causal mode is accepted and ignored for it.
    compile=True runs each decode step as one `torch.compile` graph with static shapes
    (modlm/generate/static.py): the same tokens, faster once compiled for small models and long
    generations; the model must not change under the engine.
    """

    def __init__(self, model: Backbone, mode: str = "router", compile: bool = False) -> None:
        if not hasattr(model, "decoder_layers"):
            raise GenerationError(
                f"the generation engine runs modlm models (MoDLM) and retrofitted Hugging Face "
                f"models (modlm.hf.retrofit.RetrofitLM); got a {type(model).__name__}")
        cfg = model.cfg
        if mode == "topk":
            raise GenerationError("mode 'topk' is not causal (whether a token is routed depends on "
                                  "later tokens) and cannot generate; use mode='router' or "
                                  "'predictor' (paper Sec 3.5)")
        if mode not in GENERATION_MODES:
            raise GenerationError(f"unknown generation mode {mode!r}; choose one of "
                                  f"{GENERATION_MODES}")
        if not cfg.is_dense:
            # Deviation: the random control's causal rule routes each token with probability
            # capacity (RandomRouter.causal_threshold), so it generates in mode 'router' too.
            if mode == "router" and cfg.routing.router == "learned" \
                    and cfg.routing.aux_loss_weight == 0:
                raise GenerationError(
                    "mode 'router' routes a token iff sigmoid(r) > 0.5, which only means 'in the "
                    "top-k' for a learned router trained with the auxiliary BCE loss; this model "
                    f"has routing.aux_loss_weight={cfg.routing.aux_loss_weight}. Use "
                    "mode='predictor' if it has a predictor, or train with aux_loss_weight > 0")
            if mode == "router" and cfg.routing.router == "attention":
                raise GenerationError(AttentionRouter.NO_ROUTER_RULE)
            if mode == "predictor" and not (cfg.routing.predictor
                                            and cfg.routing.predictor_loss_weight > 0):
                raise GenerationError(
                    "mode 'predictor' needs a model trained with routing.predictor=true and "
                    "routing.predictor_loss_weight > 0; this model's predictor is absent or "
                    "untrained. Use mode='router' (needs the auxiliary loss)")
        if model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0
                                  for m in model.modules()):
            raise GenerationError(f"the {type(model).__name__} is in training mode and has "
                                  f"dropout, which would make generation random; call "
                                  f"model.eval() first")
        self.model = model
        self.mode = mode
        self.cfg = cfg
        self.layers = model.decoder_layers()
        self.context = model.context_length
        self.context_name = (f"max_seq_len={self.context}" if self.context == cfg.max_seq_len
                              else f"of {self.context} tokens (its attention window)")
        self.device = next(model.parameters()).device
        # compile=True: the whole decode step as one graph with static shapes (static.py).
        if compile and cfg.moe_layers:
            raise GenerationError("compile=True does not support mixture-of-experts layers "
                                  "(their expert dispatch has data-dependent shapes); use the "
                                  "eager engine (compile=False)")
        if compile and any(isinstance(layer, RoutedLayer) and layer.kv_capacity is not None
                           for layer in self.layers):
            raise GenerationError("compile=True does not support routing keys and values apart "
                                  "from queries (routing.kv_capacity); use the eager engine "
                                  "(compile=False)")
        if compile and not hasattr(torch.compiler, "keep_portable_guards_unsafe"):
            raise GenerationError(f"compile=True needs a newer torch (its guard filters; torch "
                                  f"{torch.__version__} has none); use compile=False or "
                                  f"upgrade torch")
        self.compiled = compile
        self._static = StaticStep(model, self.layers, mode)
        self._static_fn = self._static.compiled() if compile else None
        self._signature = self._static.signature()

    # ---- input checks --------------------------------------------------------------------------

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) \
                and not isinstance(prompts, Tensor):
            raise GenerationError("prompts must be a list of token-id lists, one per row")
        if len(prompts) == 0:
            raise GenerationError("no prompts given; pass a list of token-id lists")
        V, L = self.cfg.vocab_size, self.context
        out: list[list[int]] = []
        for b, prompt in enumerate(prompts):
            if isinstance(prompt, Tensor):
                prompt = prompt.tolist()
            if isinstance(prompt, (int, str, bytes)) or not isinstance(prompt, Sequence):
                raise GenerationError(f"prompt {b} is not a list of token ids (got "
                                      f"{type(prompt).__name__}); pass a list of lists")
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise GenerationError(f"prompt {b} holds a value that is not an integer token "
                                      f"id") from None
            if not ids:
                raise GenerationError(f"prompt {b} is empty; every row needs at least one token "
                                      f"(e.g. a beginning-of-text id)")
            if len(ids) >= L:
                raise GenerationError(f"prompt {b} has {len(ids)} tokens but the model's context "
                                      f"is {self.context_name}, which must hold the prompt and at "
                                      f"least one new token; shorten it to at most {L - 1}")
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise GenerationError(f"prompt {b} has token ids {bad[:5]} outside the "
                                      f"vocabulary 0..{V - 1}; check the tokenizer matches the "
                                      f"model")
            out.append(ids)
        return out

    # ---- prefill and decode --------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], *, max_tokens: int | None = None,
                all_logits: bool = False, capacity: int | None = None
                ) -> tuple[DecodeState, Tensor]:
        """Run the prompts through the model and fill the caches.

        max_tokens: the most tokens any row will feed through the model (prompt + decoded), at
        most the context (the default). Returns the state and the logits of each row's last
        prompt token (B, V), or with all_logits the logits of every position (B, T, V),
        right-padded (positions past a row's prompt are meaningless). `capacity` is max_tokens's
        old name, still accepted with a DeprecationWarning (in modlm capacity is the routed
        fraction).
        """
        if capacity is not None:
            if max_tokens is not None and max_tokens != capacity:
                raise GenerationError(f"prefill got max_tokens={max_tokens} and its old name "
                                      f"capacity={capacity}; give max_tokens alone")
            warnings.warn("Engine.prefill(capacity=...) is now Engine.prefill(max_tokens=...)",
                          DeprecationWarning, stacklevel=3)   # 3: past inference_mode's wrapper
            max_tokens = capacity
        ids = self._check_prompts(prompts)
        L = self.context
        max_tokens = L if max_tokens is None else max_tokens
        lengths = [len(p) for p in ids]
        if not max(lengths) <= max_tokens <= L:
            raise GenerationError(f"max_tokens must be in {max(lengths)}..{L} (longest prompt.."
                                  f"context), got {max_tokens}")
        B, T, dev = len(ids), max(lengths), self.device
        idx_BT = torch.zeros(B, T, dtype=torch.long, device=dev)
        for b, p in enumerate(ids):
            idx_BT[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        len_B = torch.tensor(lengths, dtype=torch.long, device=dev)
        valid_BT = torch.arange(T, device=dev) < len_B[:, None]
        pos_BT = torch.arange(T, device=dev).expand(B, T)

        x_BTD = self.model.embed_tokens(idx_BT, pos_BT)
        pe = self.model.encode_positions(pos_BT)
        caches: list[LayerCache] = []
        routed_tokens, seen_tokens = [], []
        for layer in self.layers:
            if isinstance(layer, RoutedLayer):
                x_BTD, cache, n_routed = self._prefill_routed(layer, x_BTD, pos_BT, valid_BT,
                                                              max_tokens)
            else:
                cache = _empty_cache(layer, B, max_tokens, max_tokens, False, dev)
                up = causal_update(layer, x_BTD, pe, valid_BT, drop_overflow=False)
                x_BTD, (k, v) = x_BTD + up.delta, up.kv
                # Padding slots are written too but lie past n_B, so attention never sees them.
                cache.fill(k, v, pos_BT, len_B)
                n_routed = sum(lengths)
            caches.append(cache)
            routed_tokens.append(n_routed)
            seen_tokens.append(sum(lengths))

        if all_logits:
            logits = self.model.head(x_BTD)
        else:
            logits = self.model.head(x_BTD[torch.arange(B, device=dev), len_B - 1])
        state = DecodeState(rows=list(range(B)), positions=np.array(lengths, dtype=np.int64),
                            caches=caches,
                            max_tokens=max_tokens, routed_tokens=routed_tokens,
                            seen_tokens=seen_tokens, retired_entries=[0] * len(caches))
        return state, logits

    def _prefill_routed(self, layer: RoutedLayer, x_BTD: Tensor, pos_BT: Tensor,
                        valid_BT: Tensor, max_tokens: int) -> tuple[Tensor, LayerCache, int]:
        if layer.kv_capacity is not None:
            return self._prefill_decoupled(layer, x_BTD, pos_BT, valid_BT, max_tokens)
        logits_BT, _, mask_BT = layer.causal_decision(x_BTD, self.mode)
        sel = routing.Selection.from_mask(mask_BT & valid_BT)   # padding is never routed
        n_B = sel.valid_NK.sum(dim=1)
        cache = _empty_cache(layer.inner, x_BTD.shape[0],
                             min(max_tokens, sel.idx_NK.shape[1] + _ROUTED_HEADROOM), max_tokens,
                             True, x_BTD.device)

        def compute(x_BKD: Tensor) -> tuple[Tensor, None]:
            pos_BK = sel.gather(pos_BT)                                  # true positions
            # Valid entries precede padding in every row, so the causal mask over K is by
            # original position and never lets a routed token see padding.
            up = causal_update(layer.inner, x_BKD, self.model.encode_positions(pos_BK),
                               sel.valid_NK, drop_overflow=False, mlp=not layer.attention_only)
            cache.fill(*up.kv, pos_BK, n_B)
            return up.delta, None

        x_BTD, _ = routing.routed_update(x_BTD, sel, layer.router_weights(sel.gather(logits_BT)),
                                         compute)
        x_BTD = layer.unrouted_mlp(x_BTD, valid_BT, drop_overflow=False)[0]
        return x_BTD, cache, int(n_B.sum())

    def _prefill_decoupled(self, layer: RoutedLayer, x_BTD: Tensor, pos_BT: Tensor,
                           valid_BT: Tensor, max_tokens: int) -> tuple[Tensor, LayerCache, int]:
        """Prefill of a layer that routes keys and values apart from its queries: its cache
        holds the key/value tokens; the queries get Eq. 1's update. Returns (x, cache, queries)."""
        logits_BT, pred_BT, mask_BT = layer.causal_decision(x_BTD, self.mode)
        q_BT = mask_BT & valid_BT                                 # padding is never routed
        kv_BT = layer.kv_mask(logits_BT, layer.split_prediction(pred_BT)[1], q_BT, self.mode,
                              valid_BT)
        sel = routing.Selection.from_mask(q_BT)
        x_BTD, _, kv_sel, kv = decoupled_update(
            layer.inner, x_BTD, sel, kv_BT, pos_BT, self.model.encode_positions,
            layer.router_weights(sel.gather(logits_BT)), drop_overflow=False,
            mlp=not layer.attention_only)
        cache = _empty_cache(layer.inner, x_BTD.shape[0],
                             min(max_tokens, kv_sel.idx_NK.shape[1] + _ROUTED_HEADROOM),
                             max_tokens, True, x_BTD.device)
        if kv is not None:
            cache.fill(*kv, kv_sel.gather(pos_BT), kv_sel.valid_NK.sum(dim=1))
        x_BTD = layer.unrouted_mlp(x_BTD, valid_BT, drop_overflow=False)[0]
        return x_BTD, cache, int(q_BT.sum())

    @torch.inference_mode()
    def decode_step(self, state: DecodeState, tokens: Sequence[int] | Tensor) -> Tensor:
        """Feed one token per live row; return the next-token logits (B, V)."""
        B = state.batch_size
        tok_B = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1)
        if tok_B.numel() != B:
            raise GenerationError(f"decode_step needs one token per live row ({B}), "
                                  f"got {tok_B.numel()}")
        if B == 0:
            raise GenerationError("no live rows left to decode")
        V = self.cfg.vocab_size
        lo, hi = (int(t) for t in torch.aminmax(tok_B))
        if lo < 0 or hi >= V:
            raise GenerationError(f"token ids must be in 0..{V - 1}, got {tok_B.tolist()}")
        return self._step(state, tok_B)

    @torch.inference_mode()
    def _step(self, state: DecodeState, tok_B: Tensor) -> Tensor:
        """`decode_step` without checking the tokens (the engine's own samples are in range).

        The hot path of generation: per layer, the fewest device operations and (on a CPU) no
        reads of the device but a routed layer's decision. Cache counts and positions are on the
        host, every dense layer shares one attention mask, and a routed layer gathers and
        scatters only when some rows route and others do not.
        """
        if max(state.positions.tolist()) >= state.max_tokens:
            raise GenerationError(f"a row has reached the most tokens its caches hold "
                                  f"({state.max_tokens}); prefill with a larger max_tokens")
        if self.compiled:
            return self._static_step(state, tok_B)
        B, dev = state.batch_size, self.device
        pos_B = state.pos_B
        x_B1D = self.model.embed_tokens(tok_B[:, None], pos_B[:, None])
        pe_B1 = self.model.encode_positions(pos_B[:, None])
        every = Rows.every(B, dev)
        dense_mask: Tensor | None = None       # shared by every dense layer in this step
        dense_n: np.ndarray | None = None
        for i, (layer, cache) in enumerate(zip(self.layers, state.caches)):
            state.seen_tokens[i] += B
            if not isinstance(layer, RoutedLayer):
                q, k, v = layer.project(x_B1D, pe_B1)
                n_B = cache.append(every, k[:, 0], v[:, 0], pos_B)
                if dense_n is None:
                    dense_n, dense_mask = n_B, _length_mask(n_B, dev)
                y = _attend_cached(layer, q, cache, every, dense_n, dense_mask)
                x_B1D = x_B1D + finish(layer, x_B1D, y, None, drop_overflow=False)[0]
                state.routed_tokens[i] += B
                continue
            if layer.kv_capacity is not None:
                x_B1D, n_queries = self._decoupled_step(layer, cache, x_B1D, pe_B1, pos_B)
                state.routed_tokens[i] += n_queries
                x_B1D = layer.unrouted_mlp(x_B1D, drop_overflow=False)[0]
                continue
            mask_B, logits_B1 = layer.decide_one(x_B1D, self.mode)
            rows = Rows.where(mask_B)            # only the rows whose token routes
            state.routed_tokens[i] += rows.host.size
            if rows.host.size:
                x_B1D = self._routed_step(layer, cache, x_B1D, logits_B1, rows, pe_B1, pos_B)
            x_B1D = layer.unrouted_mlp(x_B1D, drop_overflow=False)[0]
        state.positions = state.positions + 1
        return self.model.head(x_B1D[:, 0])

    def _static_step(self, state: DecodeState, tok_B: Tensor) -> Tensor:
        """The compiled step (static.py) over caches of `state.max_tokens` slots each."""
        # Inference tensors throughout (tokens sampled outside inference mode are not): a graph
        # guards on the kind of tensor it is given, and a second kind would compile it again.
        tok_B = tok_B.clone()
        if self._static.signature() != self._signature:
            raise GenerationError("the model changed under this compiled engine (a cast, a move "
                                  "or a swapped router or layer); build a new Engine for it")
        caches = state.caches
        for c in caches:
            if c.routed:
                c.make_room(_bounds(c.n_host)[1] + 1)       # room for this step's token
            elif c.slots != state.max_tokens:
                raise GenerationError("a dense cache of this state does not hold all max_tokens "
                                      "slots; decode it with the engine that prefilled it")
        counts = [c.n_B if c.routed else None for c in caches]
        pos_B = state.pos_B
        # The batch and slot axes are dynamic in the graph: a batch that shrinks as rows finish,
        # caches of another request's max_tokens and routed caches that grew run the same graph.
        for t, dims in [(tok_B, (0,)), (pos_B, (0,))] + [
                (t, (0, 2)) for c in caches for t in (c.k_BHCd, c.v_BHCd)] + [
                (c.pos_BC, (0, 1)) for c in caches] + [(n, (0,)) for n in counts if n is not None]:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(t, dim)
        before = [c.entries() for c in caches]
        logits_BV = self._static_fn(tok_B, pos_B, [c.k_BHCd for c in caches],
                                    [c.v_BHCd for c in caches], [c.pos_BC for c in caches],
                                    counts)
        B = state.batch_size
        for i, (cache, n_B) in enumerate(zip(caches, counts)):
            if n_B is None:
                cache.n_host += 1
            elif n_B.device.type != "cpu":      # on a CPU the counts are the host's own memory
                cache.n_host[:] = n_B.cpu().numpy()
            state.seen_tokens[i] += B
            state.routed_tokens[i] += cache.entries() - before[i]
        state.positions = state.positions + 1
        return logits_BV

    def _routed_step(self, layer: RoutedLayer, cache: LayerCache, x_B1D: Tensor,
                     logits_B1: Tensor | None, rows: Rows, pe_B1: PositionEncoding,
                     pos_B: Tensor) -> Tensor:
        """Eq. 1 for the rows whose new token routes into `layer` (at least one); logits_B1:
        the router's logits of every row, or None to score only the routed rows."""
        sel = routing.Selection.rows(rows.index, every=rows.all)
        logits_N1 = (layer.router(sel.gather(x_B1D)) if logits_B1 is None
                     else sel.gather(logits_B1))

        def compute(x_N1D: Tensor) -> tuple[Tensor, None]:
            step = layer.inner
            pe_N1 = pe_B1 if rows.all else _take_rows(pe_B1, rows.index)
            q, k, v = step.project(x_N1D, pe_N1)
            n_N = cache.append(rows, k[:, 0], v[:, 0],
                               pos_B if rows.all else pos_B.index_select(0, rows.index))
            y = _attend_cached(step, q, cache, rows, n_N, _length_mask(n_N, x_N1D.device))
            return finish(step, x_N1D, y, None, drop_overflow=False,
                          mlp=not layer.attention_only)[0], None

        return routing.routed_update(x_B1D, sel, layer.router_weights(logits_N1), compute)[0]

    def _decoupled_step(self, layer: RoutedLayer, cache: LayerCache, x_B1D: Tensor,
                        pe_B1: PositionEncoding, pos_B: Tensor) -> tuple[Tensor, int]:
        """A decode step of a layer that routes keys and values apart from its queries: rows
        whose new token is a key/value append it to the cache; rows whose token is also a query
        attend over their cache (the new token included) and get Eq. 1's update. Returns the new
        x and the number of query rows."""
        q_B, kv_B, logits_B1 = layer.decide_one_kv(x_B1D, self.mode)
        kv_rows = Rows.where(kv_B)
        if not kv_rows.host.size:
            return x_B1D, 0
        step, dev = layer.inner, x_B1D.device
        take = routing.Selection.rows(kv_rows.index, every=kv_rows.all)
        q_N1Hd, k_N1Gd, v_N1Gd = step.project(
            take.gather(x_B1D), pe_B1 if kv_rows.all else _take_rows(pe_B1, kv_rows.index))
        n_N = cache.append(kv_rows, k_N1Gd[:, 0], v_N1Gd[:, 0], take.gather(pos_B[:, None])[:, 0])
        q_rows = Rows.where(q_B)
        if not q_rows.host.size:
            return x_B1D, 0
        is_query_N = np.zeros(q_B.shape[0], dtype=bool)
        is_query_N[q_rows.host] = True
        is_query_N = is_query_N[kv_rows.host]         # which key/value rows are queries
        sel = routing.Selection.rows(q_rows.index, every=q_rows.all)
        logits_M1 = (layer.router(sel.gather(x_B1D)) if logits_B1 is None
                     else sel.gather(logits_B1))

        def compute(x_M1D: Tensor) -> tuple[Tensor, None]:
            q_M1Hd = (q_N1Hd if is_query_N.all()
                      else q_N1Hd.index_select(0, _on_device(np.flatnonzero(is_query_N), dev)))
            n_M = n_N[is_query_N]
            y = _attend_cached(step, q_M1Hd, cache, q_rows, n_M, _length_mask(n_M, dev))
            return finish(step, x_M1D, y, None, drop_overflow=False,
                          mlp=not layer.attention_only)[0], None

        return (routing.routed_update(x_B1D, sel, layer.router_weights(logits_M1), compute)[0],
                int(q_rows.host.size))

    # ---- generation ----------------------------------------------------------------------------

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int | Sequence[int] | None = None, stop_token_ids: Sequence[int] = (),
               stop_strings: Sequence[str] = (), tokenizer: _Decoder | None = None,
               truncate: bool = False) -> GenerationStream:
        """Like `generate`, but iterate for the tokens of each step as they come."""
        return GenerationStream(self._run(prompts, max_new_tokens, temperature, top_k, top_p,
                                          seed, stop_token_ids, stop_strings, tokenizer,
                                          truncate))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int] | None = None, stop_token_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), tokenizer: _Decoder | None = None,
                 truncate: bool = False,
                 on_step: Callable[[StepTokens], None] | None = None) -> GenerationResult:
        """Generate up to max_new_tokens for each prompt (a list of token-id lists).

        temperature 0 is greedy; otherwise sample, optionally restricted by top_k / top_p, from a
        torch.Generator seeded with `seed` (the global RNG when None). A row finishes at a stop
        token (kept in its output), when its generated text contains a stop string (needs
        `tokenizer`), at max_new_tokens, or, with truncate=True, when prompt + new tokens reach
        max_seq_len (without truncate such a request is refused). `on_step` is called after each
        step with that step's tokens (streaming).
        """
        stream = self.stream(prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, stop_token_ids=stop_token_ids,
                             stop_strings=stop_strings, tokenizer=tokenizer, truncate=truncate)
        for step in stream:
            if on_step is not None:
                on_step(step)
        return stream.result

    def generate_text(self, tokenizer: _TextTokenizer, prompts: str | Sequence[str],
                      max_new_tokens: int, **kwargs: Any) -> TextGeneration:
        """Encode text prompts, generate, and decode each continuation (cut before a stop string,
        without a final stop token). Keyword arguments are `generate`'s."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        result = self.generate(_encode_prompts(tokenizer, texts), max_new_tokens,
                               tokenizer=tokenizer, **kwargs)
        stops = set(kwargs.get("stop_token_ids", ()))
        stop_strings = kwargs.get("stop_strings", ())
        out = []
        for toks, reason in zip(result.tokens, result.finish_reasons):
            if reason == "stop_token" and toks and toks[-1] in stops:
                toks = toks[:-1]
            text = tokenizer.decode(list(toks))
            if reason == "stop_string":
                text = text[:min(i for s in stop_strings if (i := text.find(s)) >= 0)]
            out.append(text)
        return TextGeneration(tuple(out), result)

    def stream_text(self, tokenizer: _TextTokenizer, prompt: str, max_new_tokens: int,
                    **kwargs: Any) -> TextStream:
        """Yield the continuation of one text prompt piece by piece as it is generated (what a
        terminal prints). Text ending in U+FFFD (a multi-byte character cut short) or in the start
        of a stop string is held back until later tokens settle it; a final stop token and stop
        strings are not printed.
        Keyword arguments are `generate`'s; the returned stream's `result` has the statistics."""
        stops = set(kwargs.get("stop_token_ids", ()))
        stop_strings = list(kwargs.get("stop_strings", ()))
        stream = self.stream(_encode_prompts(tokenizer, [prompt]), max_new_tokens,
                             tokenizer=tokenizer, **kwargs)
        return TextStream(self._text_pieces(stream, tokenizer, stops, stop_strings), stream)

    @staticmethod
    def _text_pieces(stream: GenerationStream, tokenizer: _TextTokenizer, stops: set[int],
                     stop_strings: list[str]) -> Iterator[str]:
        toks: list[int] = []
        shown = 0
        for step in stream:
            tok = step.tokens[0]
            if step.finished and tok in stops:
                break
            toks.append(tok)
            text = tokenizer.decode(toks)
            cut = [i for s in stop_strings if (i := text.find(s)) >= 0]
            if cut:
                text = text[:min(cut)]
            elif not step.finished:
                if text.endswith("\ufffd"):
                    continue
                # Hold back a tail that may be the start of a stop string.
                hold = max((k for s in stop_strings for k in range(1, len(s))
                            if text.endswith(s[:k])), default=0)
                text = text[:len(text) - hold]
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)

    def _run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, seed: int | Sequence[int] | None,
             stop_token_ids: Sequence[int], stop_strings: Sequence[str],
             tokenizer: _Decoder | None,
             truncate: bool) -> Iterator[StepTokens | GenerationResult]:
        # Everything is checked before the first token so a bad request fails on the call.
        ids = self._check_prompts(prompts)
        _check_sampling(temperature, top_k, top_p)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
                or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, "
                                  f"got {max_new_tokens!r}")
        if seed is not None and not isinstance(seed, int) and len(seed) != len(ids):
            raise GenerationError(f"seed lists one seed per prompt: got {len(seed)} seeds for "
                                  f"{len(ids)} prompts")
        stop_ids = {operator.index(t) for t in stop_token_ids}
        V = self.cfg.vocab_size
        if any(not 0 <= t < V for t in stop_ids):
            raise GenerationError(f"stop token ids must be in 0..{V - 1}, got {sorted(stop_ids)}")
        stop_strings = [s for s in stop_strings]
        if stop_strings and tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer to decode the generated tokens; "
                                  "pass tokenizer=")
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise GenerationError(f"stop strings must be non-empty strings, got {stop_strings!r}")
        L = self.context
        budgets = []
        for b, p in enumerate(ids):
            room = L - len(p)
            if max_new_tokens > room and not truncate:
                raise GenerationError(
                    f"prompt {b} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                    f"would exceed the context {self.context_name} (room for {room} new tokens). "
                    f"Lower max_new_tokens, shorten the prompt, or pass truncate=True to stop "
                    f"each row at the context")
            budgets.append(min(max_new_tokens, room))
        return self._loop(ids, budgets, max_new_tokens, temperature, top_k, top_p, seed,
                          stop_ids, stop_strings, tokenizer)

    def _loop(self, ids: list[list[int]], budgets: list[int], max_new_tokens: int,
              temperature: float, top_k: int | None, top_p: float | None,
              seed: int | Sequence[int] | None, stop_ids: set[int], stop_strings: list[str],
              tokenizer: _Decoder | None) -> Iterator[StepTokens | GenerationResult]:
        # One random stream per prompt, so a row's samples do not depend on the rest of the batch:
        # seed=[s0, s1, ...] gives row b the stream of s_b (the same as generating it alone with
        # seed=[s_b]); one int seeds row b with (seed, b).
        gens = None
        if seed is not None and temperature > 0:
            row_seeds = ([(seed * 1_000_003 + row) % 2**63 for row in range(len(ids))]
                         if isinstance(seed, int) else [s % 2**63 for s in seed])
            gens = [torch.Generator(device=self.device).manual_seed(s) for s in row_seeds]

        def sample(logits_BV: Tensor) -> Tensor:
            live = None if gens is None else [gens[r] for r in state.rows]
            return _sample(logits_BV, temperature, top_k, top_p, live)

        # The last sampled token of a row is never fed back, hence the -1.
        max_tokens = max(len(p) + n - 1 for p, n in zip(ids, budgets))
        # Timed: the engine's own work (prefill or decode step, and sampling up to the host
        # reading the tokens), never the time a consumer spends on a yielded step.
        t0 = time.perf_counter()
        state, logits_BV = self.prefill(ids, max_tokens=max(max_tokens, max(map(len, ids))))
        next_B = sample(logits_BV)
        tokens = next_B.tolist()
        prefill_s = time.perf_counter() - t0
        after_prefill = (list(state.routed_tokens), list(state.seen_tokens))
        out: list[list[int]] = [[] for _ in ids]
        reasons: list[str] = [""] * len(ids)
        step = 0
        decode_tokens = 0
        decode_s = 0.0
        while True:
            keep, finished = [], []
            for i, (row, tok) in enumerate(zip(state.rows, tokens)):
                out[row].append(tok)
                reason = self._finish_reason(out[row], budgets[row], max_new_tokens, stop_ids,
                                             stop_strings, tokenizer)
                if reason:
                    reasons[row] = reason
                    finished.append(row)
                else:
                    keep.append(i)
            yield StepTokens(step, tuple(state.rows), tuple(tokens), tuple(finished))
            step += 1
            if not keep:
                break
            t0 = time.perf_counter()
            with torch.inference_mode():       # the caches stay inference tensors
                state.keep(keep)
            logits_BV = self._step(state, next_B[keep])
            next_B = sample(logits_BV)
            tokens = next_B.tolist()
            decode_s += time.perf_counter() - t0
            decode_tokens += len(tokens)
        yield self._result(ids, out, reasons, state, prefill_s, decode_s, decode_tokens,
                           after_prefill)

    @staticmethod
    def _finish_reason(out: list[int], budget: int, max_new_tokens: int, stop_ids: set[int],
                       stop_strings: list[str], tokenizer: _Decoder | None) -> str:
        if out[-1] in stop_ids:
            return "stop_token"
        if stop_strings:
            # A stop string that appears now ends in the newest token: decoding a tail long
            # enough for the longest one (a character takes at most 4 byte tokens) suffices.
            tail = 4 * max(map(len, stop_strings)) + 4
            text = tokenizer.decode(out[-tail:])  # type: ignore[union-attr]
            if any(s in text for s in stop_strings):
                return "stop_string"
        if len(out) >= budget:
            return "length" if budget == max_new_tokens else "context"
        return ""

    def _result(self, ids: list[list[int]], out: list[list[int]], reasons: list[str],
                state: DecodeState, prefill_s: float, decode_s: float, decode_tokens: int,
                after_prefill: tuple[list[int], list[int]]) -> GenerationResult:
        entry_bytes = [c.entry_bytes for c in state.caches]
        fed = sum(len(p) + len(o) - 1 for p, o in zip(ids, out))
        new = sum(map(len, out))
        routed_blocks = [(i, layer.index) for i, layer in enumerate(self.layers)
                         if isinstance(layer, RoutedLayer)]
        fractions = {layer: state.routed_tokens[i] / state.seen_tokens[i]
                     for i, layer in routed_blocks}
        routed0, seen0 = after_prefill
        decode_fractions = {layer: (state.routed_tokens[i] - routed0[i])
                            / (state.seen_tokens[i] - seen0[i])
                            for i, layer in routed_blocks if state.seen_tokens[i] > seen0[i]}
        total_s = prefill_s + decode_s
        return GenerationResult(
            mode=self.mode, tokens=tuple(tuple(o) for o in out), finish_reasons=tuple(reasons),
            prompt_tokens=sum(map(len, ids)), new_tokens=new, prefill_s=prefill_s,
            decode_s=decode_s, tokens_per_s=new / total_s if total_s > 0 else math.inf,
            decode_tokens_per_s=(decode_tokens / decode_s if decode_tokens and decode_s > 0
                                 else None),
            routed_fraction=fractions, decode_routed_fraction=decode_fractions,
            kv_cache_bytes=sum(n * e for n, e in zip(state.cache_entries(), entry_bytes)),
            kv_cache_allocated_bytes=sum(c.k_BHCd.nbytes + c.v_BHCd.nbytes
                                         for c in state.caches),
            dense_kv_cache_bytes=fed * sum(entry_bytes))


def _encode_prompts(tokenizer: _TextTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text prompt; a prompt that is not Unicode text (a lone surrogate, e.g.
    bytes that are not UTF-8 from the command line) is a GenerationError, whatever the
    tokenizer."""
    for b, text in enumerate(texts):
        where = not_unicode(text) if isinstance(text, str) else None
        if where is not None:
            raise GenerationError(f"prompt {b} holds {where}: it is not Unicode text, so it has "
                                  f"no token ids; decode it as UTF-8 (or replace those "
                                  f"characters)")
    return [tokenizer.encode(t) for t in texts]


def _take_rows(pe: Any, rows_N: Tensor) -> Any:
    """The position encoding of some rows (a tensor, a tuple of tensors, or None)."""
    if pe is None:
        return None
    if isinstance(pe, Tensor):
        return pe[rows_N]
    return type(pe)(_take_rows(p, rows_N) for p in pe)
