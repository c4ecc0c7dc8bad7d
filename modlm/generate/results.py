"""What generation returns: `StepTokens` for each step (the streaming unit), `GenerationResult`
for a batch (tokens, finish reasons, timing, routed fractions, KV-cache bytes), `TextGeneration`
for text prompts, and the `GenerationStream` / `TextStream` iterators whose `result` is set once
they end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from modlm.generate.errors import GenerationError

FINISH_REASONS = ("length", "stop_token", "stop_string", "context")


@dataclass(frozen=True)
class StepTokens:
    """What one step produced: the new token of each row still generating (streaming unit)."""

    step: int
    rows: tuple[int, ...]
    tokens: tuple[int, ...]
    finished: tuple[int, ...]   # rows among `rows` that finished with this token


@dataclass(frozen=True)
class GenerationResult:
    """One batched generation.

    tokens: the new tokens of each row (prompt excluded; a stop token that ended a row is kept).
    finish_reasons: per row, one of FINISH_REASONS.
    tokens_per_s: new tokens / (prefill + decode time); decode_tokens_per_s: tokens produced by
    decode steps / decode time (None when no decode step ran).
    routed_fraction: per routed block index, tokens routed into it / tokens that reached it, over
    prefill and decode (every token fed through the model; the last sampled token of a row is
    never fed); decode_routed_fraction: the same over decode steps only (what decode speed
    depends on). kv_cache_bytes: bytes of keys and values the caches held at the end (rows that
    finished early counted at their final size); dense_kv_cache_bytes: what a cache holding every
    fed token in every block would need; kv_cache_allocated_bytes: what the live rows' caches
    occupy, padding slots and growth headroom included.
    """

    mode: str
    tokens: tuple[tuple[int, ...], ...]
    finish_reasons: tuple[str, ...]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    decode_tokens_per_s: float | None
    routed_fraction: dict[int, float]
    decode_routed_fraction: dict[int, float]
    kv_cache_bytes: int
    kv_cache_allocated_bytes: int
    dense_kv_cache_bytes: int

    @property
    def kv_cache_ratio(self) -> float:
        """KV-cache bytes used / a dense cache's bytes (1.0 for a dense model)."""
        return self.kv_cache_bytes / self.dense_kv_cache_bytes if self.dense_kv_cache_bytes else 1.0


@dataclass(frozen=True)
class TextGeneration:
    """`Engine.generate_text`'s result: the decoded continuation of each prompt, cut before any
    stop string and without the stop token, plus the token-level result."""

    texts: tuple[str, ...]
    result: GenerationResult


class GenerationStream:
    """Iterate for one `StepTokens` per step; `result` is set once the iteration has ended."""

    def __init__(self, steps: Iterator[StepTokens | GenerationResult]) -> None:
        self._steps = steps
        self._result: GenerationResult | None = None

    def __iter__(self) -> Iterator[StepTokens]:
        for item in self._steps:
            if isinstance(item, GenerationResult):
                self._result = item
            else:
                yield item

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise GenerationError("the stream has not finished; iterate it to the end first")
        return self._result


class TextStream:
    """Iterate for pieces of text as they are generated; `result` once the iteration ended."""

    def __init__(self, pieces: Iterator[str], steps: GenerationStream) -> None:
        self._pieces = pieces
        self._steps = steps

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces

    @property
    def result(self) -> GenerationResult:
        return self._steps.result

