"""``sparsealloc report PATH``: one self-contained HTML page and its markdown twin for a sweep, a
search run or a prune output.

The data is read once into a :class:`Report` (sections of plots, tables and text); one renderer
writes ``PATH/report.html`` (every plot an embedded base64 PNG, inline CSS, nothing external) and
another ``PATH/report.md`` (plots as ``PATH/report-files/*.png`` behind relative links, tables as
markdown tables). A section whose data is absent is left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from matplotlib.figure import Figure

from core.errors import SparseAllocError
from core.profile import read_profile
from orchestrator.runtime.results import load_run_results
from core.identity import write_atomic
from orchestrator.sweep.spec import model_slug

HTML_NAME, MD_NAME, FILES_DIR = "report.html", "report.md", "report-files"
METHOD_ORDER = ("uniform", "owl", "atp", "shapley-map", "fisher-map")


# --- the report's data -----------------------------------------------------------------------

@dataclass
class Plot:
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Text:
    title: str
    text: str
    code: bool = True  # JSON shown as code; else a paragraph


@dataclass
class Section:
    title: str
    items: list = field(default_factory=list)


@dataclass
class Report:
    title: str
    source: Path
    sections: list[Section]


def fmt(value, spec: str = ".2f") -> str:
    """A cell as the report prints it: ``-`` for missing or non-finite, yes/no, ints as they are."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _json(text):
    """A JSON column's value (already decoded values pass through; None and bad JSON give None)."""
    if text is None or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _method_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _target_key(target: str) -> tuple:
    """Unstructured targets first, by value, then N:M patterns."""
    try:
        return (0, float(target), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(target))


# --- figures ---------------------------------------------------------------------------------

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
    methods = sorted({m for p in panels.values() for m in (*p["lines"], *p["nm"])}, key=_method_key)
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


# --- shared pieces: sensitivities and convergence ------------------------------------------

def _sensitivity_records(folder: Path) -> dict[str, dict]:
    """``<name>.json`` records of a sensitivities folder (unreadable ones skipped)."""
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read_json(path)
        if isinstance(record, dict) and isinstance(record.get("values"), list):
            records[path.stem] = record
    return records


def _owl_m(name: str) -> float:
    try:
        return float(name.removeprefix("owl-M"))
    except ValueError:
        return math.inf


def sensitivity_items(records: dict[str, dict], shapley: dict | None = None, label: str = "") -> list:
    """Plots of the Shapley values (error bars: standard errors), Fisher traces and OWL ratios."""
    items, suffix = [], f" ({label})" if label else ""
    shapley = shapley or next((r for name, r in records.items() if name.startswith("shapley")), None)
    if shapley and shapley.get("values"):
        errors = shapley.get("stderr")
        items.append(Plot(f"Shapley values{suffix}", bars_figure(shapley["values"], "Shapley value", errors),
                          "Per-block Shapley value (KL added by pruning the block); error bars are standard "
                          "errors over permutations" if errors else "Per-block Shapley value (no standard errors)"))
    if "fisher" in records:
        values = records["fisher"]["values"]
        spread = min(values) > 0 and max(values) > 100 * min(values)
        items.append(Plot(f"Fisher traces{suffix}", bars_figure(values, "Fisher trace", log=spread),
                          "Per-block empirical Fisher trace" + (" (log scale)" if spread else "")))
    owl = {name: records[name]["values"] for name in sorted((n for n in records if n.startswith("owl-M")),
                                                            key=_owl_m)}
    if owl:
        items.append(Plot(f"OWL outlier ratios{suffix}", lines_figure({"": owl}, "block", "outlier ratio"),
                          "Share of weights whose |W|·‖X‖ exceeds M times the layer mean, one line per M"))
    return items


def _fitness_tokens(settings: dict | None) -> int | None:
    """All fitness tokens of a run (``--fitness-windows`` x ``--fitness-seqlen``), when its settings say."""
    try:
        return int(settings["fitness_windows"]) * int(settings["fitness_seqlen"])
    except (KeyError, TypeError, ValueError):
        return None


def convergence(rows: list[dict], all_tokens: int | None = None) -> dict[str, dict[str, list[float]]]:
    """Best fitness so far per driver against its cumulative tokens and evaluator seconds. Only KL rows
    of draw 0 at the driver's largest token count count as fitness (comparable values), and no Shapley
    coalition (a profile off the target); every row's tokens and seconds count as cost. A row's tokens
    None or negative mean all fitness tokens: ``all_tokens`` (unknown: above every count)."""
    by_driver: dict[str, list[dict]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.get("timestamp") or 0.0):
        if row.get("driver") and row["driver"] != "setup":
            by_driver[row["driver"]].append(row)
    out = {}
    for driver, driver_rows in by_driver.items():
        counts = [math.inf if t is None or t < 0 else t for t in (r.get("tokens") for r in driver_rows)]
        counts = [all_tokens if t == math.inf and all_tokens is not None else t for t in counts]
        top = max((t for t, r in zip(counts, driver_rows) if r.get("metric") == "kl"), default=None)
        largest = max((t for t in counts if t != math.inf), default=0)  # the cost of an "all" row, unknown
        tokens = seconds = 0.0
        best = math.inf
        curve: dict[str, list[float]] = {"tokens": [], "seconds": [], "best": []}
        for row, count in zip(driver_rows, counts):
            tokens += largest if count == math.inf else count
            seconds += row.get("seconds") or 0.0
            fitness = row.get("fitness")
            comparable = (row.get("metric") == "kl" and (row.get("draw") or 0) == 0 and count == top
                          and "coalition" not in (_json(row.get("params")) or {}))
            if comparable and fitness is not None and math.isfinite(fitness) and fitness < best:
                best = fitness
                for key, value in (("tokens", tokens), ("seconds", seconds), ("best", best)):
                    curve[key].append(value)
        if curve["best"]:
            for key, value in (("tokens", tokens), ("seconds", seconds), ("best", best)):
                curve[key].append(value)  # carry the best to the driver's last evaluation
            out[driver] = curve
    return out


CONVERGENCE_CAPTION = ("Best validation KL so far against the driver's cumulative evaluated tokens and evaluator "
                       "seconds (summed compute time of its evaluations). Only KL evaluations of draw 0 at the "
                       "driver's largest token count are used as fitness, so the values are comparable; "
                       "lower-fidelity evaluations, other draws and Shapley coalitions count as cost only.")


def convergence_plot(rows: list[dict], title: str = "Best validation KL so far", caption: str = CONVERGENCE_CAPTION,
                     all_tokens: int | None = None) -> Plot | None:
    curves = convergence(rows, all_tokens)
    if not curves:
        return None
    panels = {"by tokens": {d: c["best"] for d, c in curves.items()},
              "by evaluator seconds": {d: c["best"] for d, c in curves.items()}}
    steps = {"by tokens": {d: c["tokens"] for d, c in curves.items()},
             "by evaluator seconds": {d: c["seconds"] for d, c in curves.items()}}
    values = [v for c in curves.values() for v in c["best"]]
    positive = min(values) > 0 and max(values) > 10 * min(values)  # log scale when it spans a decade
    xlabels = {"by tokens": "cumulative evaluated tokens", "by evaluator seconds": "cumulative evaluator seconds"}
    png = lines_figure(panels, xlabels, "best validation KL", steps, log=positive)
    return Plot(title, png, caption)


def _read_json(path: Path):
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _shapley_details(run: Path) -> dict | None:
    """The shapley driver's values (and standard errors) in a run's summary.json, if it has them."""
    summary = _read_json(run / "summary.json")
    drivers = summary.get("drivers") if isinstance(summary, dict) else None
    details = ((drivers or {}).get("shapley") or {}).get("details") or {}
    return details if details.get("values") else None


def _run_rows(run: Path) -> list[dict]:
    try:
        return load_run_results(run).to_pylist()
    except SparseAllocError:
        return []


def _flat(data: dict, prefix: str = "") -> list[list[str]]:
    """Nested dict → [key.path, value] rows (lists as JSON)."""
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", json.dumps(value) if isinstance(value, list) else fmt(value, ".6g")])
    return rows


# --- a sweep ---------------------------------------------------------------------------------

PPL_COLUMNS = {"validation_perplexity", "test_perplexity", "dense_test_perplexity"}


def _cell(column: str, value) -> str:
    """A full-table cell: perplexities .2f, sparsities .4f, seconds .1f, profiles as min-max."""
    if column in PPL_COLUMNS:
        return fmt(value)
    if column in ("sparsity", "achieved_sparsity"):
        return fmt(value, ".4f")
    if column.endswith("seconds"):
        return fmt(value, ".1f")
    if column == "profile":
        profile = _json(value) or []
        return f"{min(profile):.3f}-{max(profile):.3f}" if profile else "-"
    if column == "profile_nm":  # [[n, m] or None per block] (or "n:m" strings)
        patterns = {p if isinstance(p, str) else f"{p[0]}:{p[1]}" for p in _json(value) or [] if p}
        return " ".join(sorted(patterns)) or "-"
    return fmt(value, ".4g")


def _zero_shot_tasks(rows: list[dict]) -> list[str]:
    return sorted({task for row in rows for task in (_json(row.get("zero_shot")) or {})})


def sweep_tables(rows: list[dict]) -> tuple[Table, Table]:
    """The summary of the chosen rows (sorted) and the full table (every row, parquet order)."""
    tasks = _zero_shot_tasks(rows)
    chosen = sorted((r for r in rows if r.get("chosen")),
                    key=lambda r: (r["model"], r["pruner"], _target_key(r["target"]), _method_key(r["method"])))
    summary = Table("Chosen profiles", ["model", "target", "pruner", "method", "candidate", "validation ppl",
                                        "test ppl", "search tokens", "search seconds", *tasks],
                    [[r["model"], r["target"], r["pruner"], r["method"], fmt(r.get("candidate")),
                      fmt(r.get("validation_perplexity")), fmt(r.get("test_perplexity")), fmt(r.get("search_tokens")),
                      fmt(r.get("search_seconds"), ".1f"),
                      *[fmt((_json(r.get("zero_shot")) or {}).get(t), ".4f") for t in tasks]] for r in chosen],
                    "One row per cell: each method's pick. Perplexities on held-out validation and test windows; "
                    "zero-shot columns are accuracies." if tasks else
                    "One row per cell: each method's pick. Perplexities on held-out validation and test windows.")
    columns = [c for c in (rows[0] if rows else {}) if c not in ("protocol", "zero_shot")]
    full = Table("Every final pass", [*(c.replace("_", " ") for c in columns), *tasks],
                 [[_cell(c, r.get(c)) for c in columns]
                  + [fmt((_json(r.get("zero_shot")) or {}).get(t), ".4f") for t in tasks] for r in rows],
                 "Every row of table.parquet, in its order (column names with spaces for underscores; profile: "
                 "the smallest and largest block sparsity).")
    return summary, full


def _perplexity_panels(chosen: list[dict]) -> dict[str, dict]:
    panels: dict[str, dict] = {}
    for row in chosen:
        panel = panels.setdefault(f"{row['model']} / {row['pruner']}", {"lines": {}, "nm": {}, "dense": []})
        if row.get("test_perplexity") is None:
            continue
        point = (row["sparsity"], row["test_perplexity"])
        if row.get("nm"):
            panel["nm"].setdefault(row["method"], []).append((*point, row["nm"]))
        else:
            panel["lines"].setdefault(row["method"], []).append(point)
        if row.get("dense_test_perplexity") is not None:
            panel["dense"].append(row["dense_test_perplexity"])
    for panel in panels.values():
        dense = sorted(panel["dense"])
        panel["dense"] = dense[len(dense) // 2] if dense else None
    return panels


def _profile_panels(chosen: list[dict]) -> dict[str, dict[str, list[float]]]:
    panels: dict[str, dict[str, list[float]]] = {}
    several_pruners = len({r["pruner"] for r in chosen}) > 1
    for row in sorted(chosen, key=lambda r: (r["model"], _target_key(r["target"]), _method_key(r["method"]))):
        profile = _json(row.get("profile"))
        if profile:
            label = f"{row['method']} / {row['pruner']}" if several_pruners else row["method"]
            panels.setdefault(f"{row['model']} @ {row['target']}", {})[label] = profile
    return panels


def sweep_report(path: Path) -> Report:
    rows = pq.read_table(path / "table.parquet").to_pylist()
    chosen = [r for r in rows if r.get("chosen")]
    meta = _read_json(path / "sweep.json")
    summary, full = sweep_tables(rows)
    sections = [Section("Summary", [summary])]
    if any(r.get("test_perplexity") is not None for r in chosen):
        sections.append(Section("Perplexity versus sparsity", [Plot(
            "Test perplexity", perplexity_figure(_perplexity_panels(chosen)),
            "Test perplexity of each method's chosen profile (log scale), one panel per model and pruner; "
            "N:M targets as hollow squares at their sparsity; dashed: the dense model.")]))
    profiles = _profile_panels(chosen)
    if profiles:
        sections.append(Section("Per-block profiles", [Plot(
            "Chosen profiles", lines_figure(profiles, "block", "sparsity"),
            "Each method's chosen per-block sparsities, one panel per model and target.")]))
    searches: dict[str, list[dict]] = {}  # cells sharing one search (pruner siblings) share its dir
    for cell in (meta or {}).get("cells") or []:
        if cell.get("dir"):
            searches.setdefault(cell["dir"], []).append(cell)
    plots, shapley = [], {}
    for folder, group in searches.items():
        plots.append(convergence_plot(_run_rows(path / folder), "Cell " + ", ".join(str(c.get("id")) for c in group),
                                      "", _fitness_tokens((meta or {}).get("identity"))))
        if _shapley_details(path / folder):
            shapley.setdefault(model_slug(str(group[0].get("model"))), _shapley_details(path / folder))
    if any(plots):
        caption = Text("", CONVERGENCE_CAPTION, code=False)
        sections.append(Section("Search convergence", [caption, *filter(None, plots)]))
    models = sorted({p.parent.name for p in (path / "models").glob("*/sensitivities")} | set(shapley))
    for slug in models:
        items = sensitivity_items(_sensitivity_records(path / "models" / slug / "sensitivities"), shapley.get(slug),
                                  label=slug)
        if items:
            sections.append(Section(f"Sensitivities: {slug}", items))
    sections.append(Section("Full table", [full]))
    protocols = list(dict.fromkeys(r["protocol"] for r in rows if r.get("protocol")))
    texts = [Text(f"Protocol {i + 1}" if len(protocols) > 1 else "Protocol", json.dumps(_json(p), indent=2))
             for i, p in enumerate(protocols)]
    if meta and meta.get("spec"):
        texts.append(Text("Sweep spec", json.dumps(meta["spec"], indent=2)))
    if texts:
        sections.append(Section("Protocol and spec", texts))
    return Report(f"Sweep report: {path.resolve().name}", path, sections)


# --- a search run ----------------------------------------------------------------------------

def search_report(path: Path) -> Report:
    summary = _read_json(path / "summary.json") or {}
    config = _read_json(path / "config.json") or {}
    sections = []
    settings = config.get("config") or {}
    run_rows = [[k.replace("_", " "), fmt(settings[k], ".4g")] for k in
                ("model", "data", "method", "sparsity", "pruner", "budget_evals", "budget_minutes", "seed")
                if settings.get(k) is not None]
    labels = {"winner": ("winner", "s"), "winner_test_perplexity": ("winner test perplexity", ".2f"),
              "dense_test_perplexity": ("dense test perplexity", ".2f"),
              "atp_test_perplexity": ("best ATP test perplexity", ".2f"), "winner_vs_atp": ("winner vs ATP", "+.1%"),
              "device": ("device", "s"), "dtype": ("dtype", "s")}
    run_rows += [[label, fmt(summary[k], spec)] for k, (label, spec) in labels.items() if k in summary]
    drivers = summary.get("drivers") or {}
    passes = summary.get("final_passes") or {}
    tables = [Table("Run", ["setting", "value"], run_rows)] if run_rows else []
    if drivers:
        tasks = sorted({t for p in passes.values() for t in (p.get("zero_shot") or {})})
        tables.append(Table("Finalists", ["driver", "validation KL", "evaluations", "seconds", "validation ppl",
                                          "test ppl", "winner", *tasks],
                            [[name, fmt(d.get("validation_kl"), ".4f"), fmt(d.get("evaluations")),
                              fmt(d.get("seconds"), ".1f"), fmt(passes.get(name, {}).get("validation_perplexity")),
                              fmt(passes.get(name, {}).get("test_perplexity")),
                              "yes" if summary.get("winner") == name else "",
                              *[fmt((passes.get(name, {}).get("zero_shot") or {}).get(t), ".4f") for t in tasks]]
                             for name, d in drivers.items()],
                            "Validation KL: the search's fitness on all fitness tokens. Perplexities after the real "
                            "pruning pass (finalists only); the lowest validation perplexity wins."))
    if tables:
        sections.append(Section("Summary", tables))
    profiles = {}
    for file in sorted(path.glob("best-*.json")):
        try:
            profiles[file.stem.removeprefix("best-")] = list(read_profile(file)[0].sparsities)
        except SparseAllocError:
            continue
    for name, d in drivers.items():
        if name not in profiles and d.get("profile"):
            profiles[name] = d["profile"]
    if profiles:
        sections.append(Section("Per-block profiles", [Plot(
            "Best profile of each driver", lines_figure({"": profiles}, "block", "sparsity"),
            "Each driver's best per-block sparsities (by validation KL).")]))
    plot = convergence_plot(_run_rows(path), all_tokens=_fitness_tokens(settings))
    if plot:
        sections.append(Section("Search convergence", [plot]))
    records = _sensitivity_records(path / "sensitivities")
    fisher = ((drivers.get("evolution") or {}).get("details") or {}).get("fisher")  # evolution's seeds use them
    if "fisher" not in records and isinstance(fisher, list):
        records["fisher"] = {"values": fisher}
    items = sensitivity_items(records, _shapley_details(path))
    if items:
        sections.append(Section("Sensitivities", items))
    return Report(f"Search report: {path.resolve().name}", path, sections)


# --- a prune output --------------------------------------------------------------------------

def prune_report(path: Path) -> Report:
    metrics = _read_json(path / "metrics.json") or {}
    profile, target = read_profile(path / "profile.json")
    achieved = metrics.get("achieved_sparsity")
    overall = achieved.get("overall") if isinstance(achieved, dict) else achieved
    rows = [["model", fmt(metrics.get("model"))], ["pruner", fmt(metrics.get("pruner"))],
            ["target sparsity", fmt(metrics.get("target_sparsity", target), ".4f")],
            ["achieved sparsity", fmt(overall, ".4f")],
            ["dense perplexity", fmt(metrics.get("dense_perplexity"))],
            ["pruned perplexity", fmt(metrics.get("pruned_perplexity"))]]
    if "validation_perplexity" in metrics:
        rows.append(["validation perplexity", fmt(metrics["validation_perplexity"])])
    rows += [[k.replace("_", " "), fmt(metrics.get(k))]
             for k in ("dense_perplexity_cached", "device", "device_name", "dtype", "offload", "seed") if k in metrics]
    rows += [[f"{k.removesuffix('_s').replace('_', ' ')} seconds", fmt(v, ".1f")]
             for k, v in (metrics.get("timings") or {}).items()]
    tables = [Table("Metrics", ["metric", "value"], rows, "Perplexities on the test split; timings in seconds.")]
    if isinstance(metrics.get("zero_shot"), dict) and metrics["zero_shot"]:
        tables.append(Table("Zero-shot accuracy", ["task", "accuracy"],
                            [[task, fmt(acc, ".4f")] for task, acc in sorted(metrics["zero_shot"].items())]))
    if isinstance(metrics.get("protocol"), dict):
        tables.append(Table("Protocol", ["field", "value"], _flat(metrics["protocol"])))
    series = {"profile": list(profile.sparsities)}
    if isinstance(achieved, dict) and len(achieved.get("per_block") or []) == len(profile):
        series["achieved"] = achieved["per_block"]
    plot = Plot("Per-block profile", lines_figure({"": series}, "block", "sparsity"),
                "The profile's per-block sparsities" + (" and the zeros measured after the pass"
                                                        if "achieved" in series else ""))
    return Report(f"Prune report: {path.resolve().name}", path,
                  [Section("Final pass", tables), Section("Per-block profile", [plot])])


# --- renderers -------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2129;background:#f6f7f9}
main{max-width:1280px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:1.7em;margin:0 0 4px}h2{border-bottom:2px solid #d8dce3;padding-bottom:4px;margin-top:40px}
h3{font-size:1.05em;margin:24px 0 8px}.meta{color:#5f6673;margin:0 0 16px}
nav a{margin-right:14px;color:#2457a6;text-decoration:none}
figure{margin:12px 0;background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:12px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption,.caption{color:#5f6673;font-size:.9em;margin-top:6px}
.table{display:inline-block;max-width:100%;overflow-x:auto;background:#fff;border:1px solid #e1e4ea;
border-radius:6px;vertical-align:top}
table{border-collapse:collapse;font-size:.88em}
th,td{padding:5px 10px;border-bottom:1px solid #eceef2;text-align:left;white-space:nowrap}
th{background:#eef1f5;white-space:normal;vertical-align:bottom;min-width:3em}
.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafbfc}
pre{background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:12px;overflow-x:auto;
font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
"""


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def numeric_columns(table: Table) -> list[bool]:
    """Columns whose cells are all numbers (or ``-``, missing): right-aligned."""
    return [any(_is_number(r[i]) for r in table.rows) and all(_is_number(r[i]) or r[i] == "-" for r in table.rows)
            for i in range(len(table.columns))]


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def render_html(report: Report, generated: str) -> str:
    esc = html.escape
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(report.title)}</title><style>{CSS}</style></head><body><main>",
           f"<h1>{esc(report.title)}</h1>",
           f'<p class="meta">{esc(str(report.source.resolve()))} &middot; generated {esc(generated)}</p>',
           "<nav>" + "".join(f'<a href="#{_anchor(s.title)}">{esc(s.title)}</a>' for s in report.sections) + "</nav>"]
    for section in report.sections:
        out.append(f'<section id="{_anchor(section.title)}"><h2>{esc(section.title)}</h2>')
        for item in section.items:
            out.append(f"<h3>{esc(item.title)}</h3>" if item.title else "")
            if isinstance(item, Plot):
                data = base64.b64encode(item.png).decode("ascii")
                caption = f"<figcaption>{esc(item.caption)}</figcaption>" if item.caption else ""
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(item.title)}">'
                           f"{caption}</figure>")
            elif isinstance(item, Table):
                align = [' class="num"' if numeric else "" for numeric in numeric_columns(item)]
                head = "".join(f"<th{a}>{esc(c)}</th>" for a, c in zip(align, item.columns))
                body = "".join("<tr>" + "".join(f"<td{a}>{esc(c)}</td>" for a, c in zip(align, row)) + "</tr>"
                               for row in item.rows)
                out.append(f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                           "</table></div>")
                if item.caption:
                    out.append(f'<p class="caption">{esc(item.caption)}</p>')
            elif item.code:
                out.append(f"<pre>{esc(item.text)}</pre>")
            else:
                out.append(f'<p class="caption">{esc(item.text)}</p>')
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, generated: str, files: dict[int, str]) -> str:
    """``files`` maps ``id(plot)`` to its PNG's path relative to the report."""
    out = [f"# {report.title}", "", f"`{report.source.resolve()}`, generated {generated}", ""]
    for section in report.sections:
        out += [f"## {section.title}", ""]
        for item in section.items:
            out += [f"### {item.title}", ""] if item.title else []
            if isinstance(item, Plot):
                out += [f"![{item.title}]({files[id(item)]})", ""]
                out += [f"*{item.caption}*", ""] if item.caption else []
            elif isinstance(item, Table):
                out.append("| " + " | ".join(_md_cell(c) for c in item.columns) + " |")
                out.append("|" + "|".join("---:" if numeric else "---" for numeric in numeric_columns(item)) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in item.rows]
                out += ["", f"*{item.caption}*"] if item.caption else []
                out.append("")
            elif item.code:
                out += ["```json", item.text, "```", ""]
            else:
                out += [item.text, ""]
    return "\n".join(out)


# --- entry points ----------------------------------------------------------------------------

def report_paths(path: Path) -> tuple[Path, Path]:
    """Where ``write_report(path)`` writes the HTML page and its markdown twin."""
    return Path(path) / HTML_NAME, Path(path) / MD_NAME


def build_report(path: Path) -> Report:
    """The report's data for a sweep, search run or prune output directory."""
    path = Path(path)
    if (path / "table.parquet").is_file():
        return sweep_report(path)
    if (path / "summary.json").is_file() or (path / "results").is_dir():
        return search_report(path)
    if (path / "metrics.json").is_file() and (path / "profile.json").is_file():
        return prune_report(path)
    where = "does not exist" if not path.exists() else "is none of the directories a report is made from"
    raise SparseAllocError(f"{path} {where}: expected a sweep directory (table.parquet), a search run directory "
                           "(summary.json and results/ from `sparsealloc search --out`) or a prune output "
                           "(metrics.json and profile.json from `sparsealloc prune --out`)")


def write_report(path: Path) -> tuple[Path, Path]:
    """Write ``path/report.html`` (self-contained) and ``path/report.md`` (PNGs in ``path/report-files/``);
    returns both paths."""
    path = Path(path)
    report = build_report(path)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    folder = path / FILES_DIR
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    files = {}
    for section in report.sections:
        for item in section.items:
            if isinstance(item, Plot):  # numbered in page order, so names never collide
                name = f"{len(files) + 1:02d}-{_anchor(f'{section.title} {item.title}')}.png"
                (folder / name).write_bytes(item.png)
                files[id(item)] = f"{FILES_DIR}/{name}"
    html_path, md_path = report_paths(path)
    write_atomic(html_path, render_html(report, generated))
    write_atomic(md_path, render_markdown(report, generated, files))
    return html_path, md_path
