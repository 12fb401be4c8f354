"""The report's figures as PNG bytes (matplotlib, no pyplot state): perplexity against sparsity, lines
per block or against cost, bars per block."""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure

from orchestrator.report.model import method_key


def _grid(panels: int, width: float = 5.2, height: float = 3.4, cols: int = 3) -> tuple[Figure, list]:
    if panels == 1:
        width, height = max(width, 7.0), max(height, 4.0)
    cols = max(1, min(cols, panels))
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _png(fig: Figure) -> bytes:
    """The figure as PNG, with one legend for all its panels (colours are shared) outside on the right."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _log_y(ax) -> None:
    """A log-scale y axis labelled with plain numbers (30, 100, 300) rather than powers of ten."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _colors(labels) -> dict:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def perplexity_figure(panels: dict[str, dict]) -> bytes:
    """One panel per title: {"lines": {method: [(sparsity, ppl)]}, "nm": {method: [(sparsity, ppl,
    pattern)]}, "dense": ppl or None}; log-scale perplexity, N:M results as hollow squares."""
    methods = sorted({m for p in panels.values() for m in (*p["lines"], *p["nm"])}, key=method_key)
    color = _colors(methods)
    fig, axes = _grid(len(panels))
    for ax, (title, panel) in zip(axes, panels.items()):
        for method in methods:
            points = sorted(panel["lines"].get(method, []))
            if points:
                ax.plot(*zip(*points), marker="o", color=color[method], label=method)
            for x, y, pattern in panel["nm"].get(method, []):
                ax.scatter([x], [y], marker="s", s=60, facecolors="none", edgecolors=color[method],
                           label=f"{method} ({pattern})")
                ax.annotate(pattern, (x, y), textcoords="offset points", xytext=(6, 0), fontsize=8)
        if panel["dense"] is not None:
            ax.axhline(panel["dense"], color="0.4", linestyle="--", linewidth=1, label=f"dense ({panel['dense']:.2f})")
        _log_y(ax)
        ax.set(title=title, xlabel="target mean sparsity", ylabel="test perplexity")
        ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def lines_figure(panels: dict[str, dict[str, list[float]]], xlabel: str | dict[str, str], ylabel: str,
                 steps: dict[str, dict[str, list[float]]] | None = None, log: bool = False) -> bytes:
    """One panel per title, one line per label; ``steps`` gives x values (a step plot), else the
    x values are 0, 1, … (a block index). ``xlabel`` may differ per panel (a dict by title)."""
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    color = _colors(labels)
    dashes = {label: ("-", "--", "-.", ":")[i % 4] for i, label in enumerate(labels)}  # overlapping lines show
    fig, axes = _grid(len(panels))
    for ax, (title, series) in zip(axes, panels.items()):
        for label, ys in series.items():
            style = {"color": color[label], "linestyle": dashes[label], "label": label,
                     "linewidth": 2.5 if label == labels[0] else 1.5}
            if steps is not None:
                ax.step(steps[title][label], ys, where="post", marker="o", markersize=3, **style)
            else:
                ax.plot(range(len(ys)), ys, marker="o", markersize=3, **style)
        if log:
            _log_y(ax)
        ax.set(title=title, xlabel=xlabel[title] if isinstance(xlabel, dict) else xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        if steps is None:
            ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def trials_figure(panels: dict[str, dict], rungs: int) -> bytes:
    """One panel per Tune driver: each trial's hyper-parameter (``x``, or its start order) against its running
    KL at the last rung it reached; trials that ended below the top rung (of ``rungs``) are hollow, marked by rung."""
    fig, axes = _grid(len(panels))
    color = _colors([f"rung {r}" for r in range(1, rungs + 1)])
    for ax, (title, panel) in zip(axes, panels.items()):
        for rung in range(1, rungs + 1):
            points = [(x, kl) for x, kl, reached in panel["points"] if reached == rung]
            if not points:
                continue
            label = f"rung {rung}" + (" (top)" if rung == rungs else " (ended there)")
            top = rung == rungs
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=28 if top else 22, label=label,
                       facecolors=color[f"rung {rung}"] if top else "none", edgecolors=color[f"rung {rung}"])
        _log_y(ax)
        ax.set(title=title, xlabel=panel["xlabel"], ylabel="running KL at the last rung reached")
        ax.grid(True, alpha=0.3)
        if panel.get("integer_x"):
            ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def bars_figure(values: list[float], ylabel: str, errors: list | None = None, log: bool = False) -> bytes:
    """One bar per block, with error bars when ``errors`` is given (None entries: no bar)."""
    fig, (ax,) = _grid(1, width=7.0)
    yerr = None if errors is None else [math.nan if e is None else e for e in errors]  # NaN: no error bar
    ax.bar(range(len(values)), values, yerr=yerr, capsize=3, color="#4c72b0")
    if log:
        _log_y(ax)
    ax.set(xlabel="block", ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)

