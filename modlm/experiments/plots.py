"""Figures for the experiments' records (PNG, matplotlib's non-interactive Agg backend).

Every function takes plain numbers (lists, dicts) and a path, draws one figure and writes it, so
the experiments decide what to plot and this module only how. matplotlib is an optional extra:
it is imported when a figure is drawn, and its absence is reported with the install command.

- `isoflop_curves`:          loss against parameters, one panel per FLOP budget, one curve per
                             family, each family's optimum marked (paper Fig 4, left).
- `scatter_families`:        loss against any x (e.g. forward FLOPs normalised to the optimal
                             dense model, paper Fig 4 right), one marker style per family.
- `routing_heatmap`:         routing decisions, routed block x position, with the characters
                             (paper Fig 1 / Fig 5).
- `histograms`:              one histogram per routed block (router weights, Fig 5).
- `bars`:                    labelled bars with optional error bars.
- `lines`:                   curves over training steps (predictor accuracy, Fig 6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend, or an error that names the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("drawing the experiments' figures needs matplotlib: "
                          "pip install 'modlm[plots]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    require_matplotlib().close(fig)
    return path


def isoflop_curves(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
                   path: str | Path, xlabel: str = "parameters",
                   ylabel: str = "held-out loss (nats/byte)") -> Path:
    """panels: {panel title (e.g. the budget): {family: [(x, loss), ...]}}; the lowest loss of
    each family in each panel is marked with a star."""
    plt = require_matplotlib()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (title, families) in zip(axes[0], panels.items()):
        for j, (family, points) in enumerate(families.items()):
            pts = sorted(points)
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            line = ax.plot(xs, ys, marker=MARKERS[j % len(MARKERS)], label=family)[0]
            best = min(pts, key=lambda p: p[1])
            ax.plot([best[0]], [best[1]], marker="*", markersize=16, color=line.get_color(),
                    markeredgecolor="black", linestyle="none")
        _log_x(ax)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(title="star: optimum")
    return _save(fig, path)


def scatter_families(points: Mapping[str, Sequence[tuple[float, float, str]]],
                     path: str | Path, xlabel: str, ylabel: str = "held-out loss (nats/byte)",
                     title: str = "", logx: bool = True, vline: float | None = None) -> Path:
    """points: {family: [(x, y, label), ...]}; labels are written beside the markers."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for j, (family, pts) in enumerate(points.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[j % len(MARKERS)],
                   label=family, s=36)
        for x, y, label in pts:
            if label:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle="--", linewidth=1)
    if logx:
        _log_x(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _log_x(ax: Any) -> None:
    """A log x axis with labels on the decades only (minor labels overlap on narrow ranges)."""
    from matplotlib.ticker import NullFormatter
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def _show_char(c: str) -> str:
    return {"\n": "⏎", " ": "·", "\t": "⇥"}.get(c, c if c.isprintable() else "?")


def routing_heatmap(panels: Mapping[str, Sequence[Sequence[float]]], chars: Sequence[str],
                    layers: Sequence[int], path: str | Path, title: str = "") -> Path:
    """panels: {panel title (e.g. the routing mode): matrix routed block x position (1 =
    processed)}; `chars` label the positions (newline shown as ⏎, space as ·)."""
    plt = require_matplotlib()
    T = len(chars)
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(max(8.0, 0.11 * T), 0.45 * len(layers) * n + 1.6),
                             squeeze=False)
    for ax, (name, matrix) in zip(axes[:, 0], panels.items()):
        ax.imshow(matrix, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(layers)), [f"block {l}" for l in layers], fontsize=7)
        ax.set_xticks(range(T), [_show_char(c) for c in chars], fontsize=6, family="monospace")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def histograms(counts: Sequence[Sequence[int]], edges: Sequence[float],
               labels: Sequence[str], path: str | Path, xlabel: str,
               vline: float | None = None, title: str = "") -> Path:
    """One step histogram per row of `counts` over the shared bin `edges`, log-scaled counts."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row, label in zip(counts, labels):
        ax.stairs(row, edges, label=label)
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def bars(labels: Sequence[str], values: Sequence[float], path: str | Path, ylabel: str,
         errors: Sequence[float] | None = None, title: str = "",
         annotations: Sequence[str] | None = None, baseline: float | None = None,
         xlabel: str = "") -> Path:
    """Vertical bars (NaN values are left empty); optional error bars and text above each."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 1.5), 4.0))
    xs = range(len(labels))
    vals = [v if v is not None and not math.isnan(v) else 0.0 for v in values]
    ax.bar(xs, vals, yerr=errors, capsize=3, color="#4C72B0")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1)
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if finite and min(finite) > 0 and baseline is None:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9) - 0.01 * lo, hi + 0.15 * (hi - lo + 1e-9))
    for x, text in zip(xs, annotations or ()):
        ax.annotate(text, (x, vals[x]), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")
    long = max((len(l) for l in labels), default=0) > 3
    ax.set_xticks(list(xs), labels, rotation=20 if long else 0, ha="right" if long else "center",
                  fontsize=8)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
          xlabel: str, ylabel: str, title: str = "", hline: float | None = None,
          ylim: tuple[float, float] | None = None,
          styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """series: {label: (xs, ys)}; styles: {label: matplotlib line keywords} for some labels
    (e.g. {"color": "C1", "linestyle": "--"})."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (xs, ys) in series.items():
        style = {"marker": "." if len(xs) < 40 else None, **((styles or {}).get(label, {}))}
        ax.plot(xs, ys, label=label, **style)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
