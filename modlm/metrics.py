"""What a training run reports: typed step and evaluation records, and the one writer of both.

A run appends one JSON object per logged step (`StepRecord`) and per evaluation (`EvalRecord`) to
its `metrics.jsonl`, and with `tensorboard=true` their scalars to TensorBoard under `tb/`; a
`MetricsWriter` does both, for both kinds. The records stay typed until they are written: a value
the model does not have (no learned router, no predictor, no MoE layer) is None, written as null
and left out of TensorBoard, never a stand-in 0.0.

Step record keys: step, tokens, flops (training FLOPs so far, modlm.flops), loss, lm_loss,
router_aux_loss, predictor_loss, router_accuracy and predictor_accuracy (one value per routed
block, each averaged over the step's micro-batches and processes), lr, grad_norm, tokens_per_s;
with MoE layers moe_balance_loss, moe_noop and moe_dropped (per MoE layer); `skipped: true` on
a step whose loss or gradient was not finite. Evaluation record keys: step, tokens, flops, and
eval: {split: {mode: {loss, bpb, tokens, layers[, moe]}}} (modlm.evaluate.ModeResult).

Importing this module loads no torch; TensorBoard is imported only when a writer asks for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modlm import atomic
from modlm.config import ConfigError

if TYPE_CHECKING:
    from modlm.evaluate import ModeResult

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


@dataclass(frozen=True)
class StepStats:
    """One optimizer step's forward/backward, every value averaged over the step's micro-batches
    and processes. A loss the model does not have (no learned router, no predictor, no MoE) is
    None, never a stand-in 0.0; accuracies and MoE shares have one value per routed / MoE layer
    (none when the model has no such rule or layer)."""

    loss: float
    lm_loss: float
    router_aux_loss: float | None
    predictor_loss: float | None
    router_accuracy: tuple[float, ...]
    predictor_accuracy: tuple[float, ...]
    grad_norm: float
    moe_balance_loss: float | None = None   # MoE layers (modlm/moe.py): mean balance loss,
    moe_noop: tuple[float, ...] = ()        # and per layer the no-op and dropped shares
    moe_dropped: tuple[float, ...] = ()
    # Per routed block, where the training forward's counts vary (a threshold router): the share
    # of tokens routed; and where keys and values are routed apart: their share.
    routed_fraction: tuple[float, ...] = ()
    kv_fraction: tuple[float, ...] = ()

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass(frozen=True)
class StepRecord:
    """A logged optimizer step: where the run is, and the step's statistics."""

    step: int
    tokens: int
    flops: float
    lr: float
    tokens_per_s: float
    stats: StepStats

    def to_json(self) -> dict[str, Any]:
        st = self.stats
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops,
                "loss": st.loss, "lm_loss": st.lm_loss,
                "router_aux_loss": st.router_aux_loss, "predictor_loss": st.predictor_loss,
                "predictor_accuracy": list(st.predictor_accuracy) or None,
                "router_accuracy": list(st.router_accuracy) or None, "lr": self.lr,
                "grad_norm": st.grad_norm, "tokens_per_s": self.tokens_per_s,
                **({"moe_balance_loss": st.moe_balance_loss, "moe_noop": list(st.moe_noop),
                    "moe_dropped": list(st.moe_dropped)} if st.moe_noop else {}),
                **({"routed_fraction": list(st.routed_fraction)} if st.routed_fraction else {}),
                **({"kv_fraction": list(st.kv_fraction)} if st.kv_fraction else {}),
                **({} if st.finite else {"skipped": True})}

    def scalars(self) -> Iterator[tuple[str, float]]:
        st = self.stats
        for key in ("loss", "lm_loss", "router_aux_loss", "predictor_loss"):
            value = getattr(st, key)
            if value is not None:
                yield f"train/{key}", value
        yield "train/lr", self.lr
        yield "train/tokens_per_s", self.tokens_per_s


# split -> routing mode -> result, as modlm.evaluate.evaluate returns it per split
Evaluation = Mapping[str, Mapping[str, "ModeResult"]]


def evaluation_json(evaluation: Evaluation) -> dict[str, dict[str, dict[str, Any]]]:
    """An evaluation as metrics.jsonl records it: {split: {mode: {loss, bpb, tokens, layers}}}."""
    return {split: {mode: r.as_dict() for mode, r in modes.items()}
            for split, modes in evaluation.items()}


@dataclass(frozen=True)
class EvalRecord:
    """An evaluation during training: where the run is, and each split's results per mode."""

    step: int
    tokens: int
    flops: float
    evaluation: Evaluation

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops,
                "eval": evaluation_json(self.evaluation)}

    def scalars(self) -> Iterator[tuple[str, float]]:
        for split, modes in self.evaluation.items():
            for mode, r in modes.items():
                yield f"{split}/{mode}_loss", r.loss
                yield f"{split}/{mode}_bpb", r.bits_per_byte

    def line(self) -> str:
        """The evaluation as one console line: each split's loss and bits per byte per mode."""
        parts = [split + " " + " ".join(f"{m} {r.loss:.4f} ({r.bits_per_byte:.3f} bpb)"
                                        for m, r in modes.items())
                 for split, modes in self.evaluation.items()]
        return f"eval @ step {self.step}: " + " | ".join(parts)


class MetricsWriter:
    """Appends step and evaluation records to a run's metrics.jsonl and, if asked, their scalars
    to TensorBoard. Each record is one line, appended and closed at once, so a killed run leaves
    at most its last line half-written (`drop_after` and readers skip such a line)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False) -> None:
        self.path = run_dir / METRICS_FILE
        self._tb = _open_tensorboard(run_dir / TENSORBOARD_DIR) if tensorboard else None

    def write(self, record: StepRecord | EvalRecord) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record.to_json()) + "\n")
        if self._tb is not None:
            for tag, value in record.scalars():
                self._tb.add_scalar(tag, value, record.step)

    def drop_after(self, step: int) -> None:
        """After a resume, drop the records a killed run logged past its last checkpoint (and a
        line half-written when it was killed)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _open_tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("tensorboard=true needs the tensorboard package: "
                          "pip install 'modlm[tensorboard]'") from e
    return SummaryWriter(str(path))
