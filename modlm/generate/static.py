"""The decode step with static shapes, for `torch.compile` (`Engine(model, compile=True)`).

Legend: B batch (live rows), D model width, H heads, G key/value heads, Dh head width, C cache
slots (the same for every cache: the request's max_tokens), V vocabulary.

The eager step (`Engine._step`) sizes everything from host-side counts: attention over the slots
filled so far, a routed layer run on exactly the rows whose token routes. Shapes that change
every step would make a compiled graph recompile every step, so this step keeps every shape
fixed for a generation and one graph runs the whole step, all layers, with no host round trip:

- a dense cache holds C slots (allocated whole at prefill) and attention runs over all of them
  with a mask of the filled ones (slots <= the row's position); a routed cache grows by doubling
  as in the eager step (its slot axis is dynamic in the graph, so growing does not recompile)
  and attention masks it by the row's routed count, a tensor the graph increments;
- a routed layer's decision and the skip are inside the graph (`torch.cond`): when no row's
  token routes, the layer does nothing; when some do, the layer runs on every row of the batch
  and only the routed rows' updates and cache entries count (`torch.where` keeps the others'
  residual stream bit for bit).
At batch 1 a routed layer thus runs exactly when the eager step runs it; attention covers the
allocated slots (masked) rather than the filled ones. At batch > 1 a routed layer computes f for
rows that do not route whenever another row does: the price of static shapes.

The step computes what the eager step computes (tests compare the tokens and logits); a
compiled graph fuses and reorders float operations, so logits agree to rounding.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from modlm.block import DecoderLayer, PositionEncoding, RoutedLayer, finish
from modlm.layers import attend

_ENGINES = itertools.count()


def _step_guards(entries: Sequence[Any]) -> list[bool]:
    """The guards a compiled decode step keeps: its input tensors', symbolic shapes', global
    state's (a guard filter for torch.compile; see `StaticStep.compiled`)."""
    return [g.guard_type in ("SHAPE_ENV", "GLOBAL_STATE")
            or (g.guard_type == "TENSOR_MATCH" and not isinstance(g.value, torch.nn.Parameter))
            for g in entries]


class StaticStep:
    """One decode step over fixed-size caches (see the module docstring); call it, or its
    `torch.compile`d form, with (tokens (B,), positions (B,), keys, values, slot positions,
    counts), where keys and values are each cache's (B, G, C, Dh) tensors and slot positions its
    (B, C) true positions, all written in place, and counts holds a (B,) tensor of filled slots
    for each routed cache (None for a dense one), incremented in place. Returns the next-token
    logits (B, V)."""

    def __init__(self, model: object, layers: Sequence[DecoderLayer | RoutedLayer],
                 mode: str) -> None:
        self.model = model
        self.layers = list(layers)
        self.mode = mode

    def compiled(self) -> Callable[..., Tensor]:
        """This step under `torch.compile`, one graph for the whole step.

        Deviation from torch.compile's defaults: before each call only the guards on the
        step's input tensors (shapes, dtypes, devices), on symbolic shapes and on global state
        (grad mode, autocast) are checked, not those on the model's modules and parameters,
        which took 0.17 ms of a 1.40 ms compiled step at d256, batch 1 (the input tensors'
        alone: 0.03 ms; benchmarks/decode.md); what they would catch (a
        model cast to another dtype or moved, a router swapped) the engine checks itself with
        `signature()`, at a fraction of the cost. So that the graphs of two engines
        (a MoD model and its dense twin, of the same shapes) can never be taken for each other,
        each step compiles from a code object of its own (torch.compile keeps its graphs per
        code object).
        """
        call = StaticStep.__call__
        # A name of its own too: torch.compile's record of which shapes varied is kept per
        # (file, line, name), and another model's shapes are not this one's.
        code = call.__code__.replace(co_name=f"decode_step_{next(_ENGINES)}")
        own = types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__,
                                 call.__closure__)
        return torch.compile(types.MethodType(own, self), fullgraph=True,
                             options={"guard_filter_fn": _step_guards})

    def signature(self) -> tuple[object, ...]:
        """What the compiled graph takes for granted about the model and was not told to guard
        (see `compiled`): the parameters' dtype and device, and which router, predictor and
        inner layer each layer holds. The engine compares it before every compiled step."""
        p = next(self.model.parameters())  # type: ignore[attr-defined]
        return (p.dtype, p.device) + tuple(
            (id(layer.router), id(layer.predictor), id(layer.inner))
            if isinstance(layer, RoutedLayer) else id(layer) for layer in self.layers)

    def __call__(self, tok_B: Tensor, pos_B: Tensor, keys: list[Tensor], values: list[Tensor],
                 positions: list[Tensor], counts: list[Tensor | None]) -> Tensor:
        x_B1D = self.model.embed_tokens(tok_B[:, None], pos_B[:, None])  # type: ignore[attr-defined]
        pe_B1 = self.model.encode_positions(pos_B[:, None])  # type: ignore[attr-defined]
        rows_B = torch.arange(tok_B.shape[0], device=tok_B.device)
        seen_B11C: Tensor | None = None        # a dense cache's filled slots, shared
        for layer, k_c, v_c, p_c, n_B in zip(self.layers, keys, values, positions, counts):
            if not isinstance(layer, RoutedLayer):
                q, k, v = layer.project(x_B1D, pe_B1)
                k_c[rows_B, :, pos_B] = k[:, 0]                # a dense cache's slot = position
                v_c[rows_B, :, pos_B] = v[:, 0]
                p_c[rows_B, pos_B] = pos_B
                if seen_B11C is None:
                    slots_C = torch.arange(k_c.shape[2], device=tok_B.device)
                    seen_B11C = (slots_C <= pos_B[:, None])[:, None, None, :]
                y = attend(q.transpose(1, 2), k_c, v_c, scale=layer.attn_scale, mask=seen_B11C)
                x_B1D = x_B1D + finish(layer, x_B1D, y, None, drop_overflow=False)[0]
                continue
            assert n_B is not None
            x_B1D = self._routed(layer, x_B1D, pe_B1, pos_B, k_c, v_c, p_c, n_B, rows_B)
            x_B1D = layer.unrouted_mlp(x_B1D, drop_overflow=False)[0]
        return self.model.head(x_B1D[:, 0])  # type: ignore[attr-defined]

    def _routed(self, layer: RoutedLayer, x_B1D: Tensor, pe_B1: PositionEncoding, pos_B: Tensor,
                k_c: Tensor, v_c: Tensor, p_c: Tensor, n_B: Tensor, rows_B: Tensor) -> Tensor:
        """Eq. 1 for the rows whose token routes, inside the graph. The branch that runs the layer
        only reads the cache (its new key and value join the attention directly); the cache
        writes happen after it."""
        route_B, logits_B1 = layer.decide_one(x_B1D, self.mode)  # type: ignore[arg-type]
        if logits_B1 is None:                       # mode "predictor": score every row here
            logits_B1 = layer.router(x_B1D)
        inner = layer.inner
        slots_S = torch.arange(k_c.shape[2], device=n_B.device)   # this cache's own slots
        cached_B11S = (slots_S < n_B[:, None])[:, None, None, :]
        B, G, _, Dh = k_c.shape

        def run(x_B1D: Tensor, k_c: Tensor, v_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            q, k, v = inner.project(x_B1D, pe_B1)
            y = _attend_with_new(q, k[:, 0], v[:, 0], k_c, v_c, cached_B11S, inner.attn_scale)
            delta_B1D = finish(inner, x_B1D, y, None, drop_overflow=False,
                               mlp=not layer.attention_only)[0]
            w_B1 = layer.router_weights(logits_B1)
            # Fresh tensors: both branches' outputs must have the same layout.
            return (x_B1D + (w_B1.unsqueeze(-1) * delta_B1D).to(x_B1D.dtype),
                    k[:, 0].clone(memory_format=torch.contiguous_format),
                    v[:, 0].clone(memory_format=torch.contiguous_format))

        def skip(x_B1D: Tensor, k_c: Tensor, v_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            empty = k_c.new_zeros(B, G, Dh)
            return x_B1D.clone(), empty, empty.clone()

        # Deviation: when any row's token routes, f runs on every row (static shapes) and only
        # the routed rows keep it; the eager step runs exactly the routed rows (docs/design.md).
        new_B1D, k_BGd, v_BGd = torch.cond(route_B.any(), run, skip, (x_B1D, k_c, v_c))
        # Every row writes its next free slot; a row that did not route leaves its count as it
        # was, so what it wrote there is past its filled slots (never attended to) and is
        # overwritten when it next routes.
        k_c[rows_B, :, n_B] = k_BGd
        v_c[rows_B, :, n_B] = v_BGd
        p_c[rows_B, n_B] = pos_B
        n_B.add_(route_B.long())
        return torch.where(route_B[:, None, None], new_B1D, x_B1D)


def _attend_with_new(q_B1Hd: Tensor, k_BGd: Tensor, v_BGd: Tensor, k_BGCd: Tensor,
                     v_BGCd: Tensor, cached_B11C: Tensor, scale: float | None) -> Tensor:
    """Attention of one query per row over the row's cached slots (`cached_B11C`) and its own new
    key and value, without writing them to the cache: (B, H, 1, Dh). Grouped-query attention:
    the R = H / G query heads of a key/value head attend together."""
    B, _, H, Dh = q_B1Hd.shape
    G = k_BGd.shape[1]
    scale = Dh ** -0.5 if scale is None else scale
    q_BGRd = q_B1Hd.reshape(B, G, H // G, Dh).float() * scale
    old_BGRC = (q_BGRd @ k_BGCd.float().transpose(-1, -2)).masked_fill(
        ~cached_B11C, float("-inf"))
    new_BGR1 = q_BGRd @ k_BGd.float().unsqueeze(-1)
    p_BGRx = torch.softmax(torch.cat((old_BGRC, new_BGR1), dim=-1), dim=-1)
    y_BGRd = p_BGRx[..., :-1] @ v_BGCd.float() + p_BGRx[..., -1:] * v_BGd.float().unsqueeze(2)
    return y_BGRd.reshape(B, H, 1, Dh).to(q_B1Hd.dtype)
