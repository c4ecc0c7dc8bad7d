"""Markdown tables and number formatting for experiment reports: any table (`markdown_table`)
and the standard per-run one (`results_table`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from modlm.experiments.spec import RunResult


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str | None = None) -> str:
    """A markdown table; `align` has one letter per column, l or r (default: text left, numbers
    right)."""
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l"
                        for i in range(len(headers)))
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def results_table(results: Sequence[RunResult], reference: RunResult | None = None,
                  modes: Sequence[str] = ("topk", "router", "predictor")) -> str:
    """The standard per-run table: size, forward FLOPs (relative to `reference` when given),
    steps, median step time, held-out loss in each mode, the headline (causal) loss."""
    headers = ["run", "family", "params", "fwd GFLOP/seq"]
    if reference is not None:
        headers.append(f"fwd FLOPs / {reference.name}")
    headers += ["steps", "step ms"] + [f"loss {m}" for m in modes] + ["headline loss", "bpb"]
    rows = []
    for r in results:
        row: list[Any] = [r.name, r.family, f"{r.params:,d}", f"{r.forward_flops / 1e9:.3f}"]
        if reference is not None:
            row.append(f"{r.forward_flops / reference.forward_flops:.3f}")
        row += [r.steps, "-" if r.median_step_s is None else f"{r.median_step_s * 1e3:.0f}"]
        row += [fmt(r.eval["val"][m]["loss"]) if m in r.eval["val"] else "-" for m in modes]
        row += [f"{fmt(r.headline_loss)} ({r.headline_mode})",
                fmt(r.eval["val"][r.headline_mode]["bpb"], 3)]
        rows.append(row)
    return markdown_table(headers, rows, "llrr" + ("r" if reference else "") + "rr"
                          + "r" * len(modes) + "rr")

