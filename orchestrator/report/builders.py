"""Read a sweep directory, a search run directory or a prune output into a :class:`Report`; a section
whose data is absent is left out."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from core.errors import SparseAllocError
from core.profile import read_profile
from orchestrator.report.figures import lines_figure, perplexity_figure
from orchestrator.report.model import Plot, Report, Section, Table, Text, fmt, json_value, method_key, target_key
from orchestrator.report.sections import (CONVERGENCE_CAPTION, convergence_plot, fitness_tokens, read_json,
                                          results_rows, sensitivity_items, sensitivity_records, shapley_details,
                                          trials_plot)
from orchestrator.runtime.rundir import model_slug

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
        profile = json_value(value) or []
        return f"{min(profile):.3f}-{max(profile):.3f}" if profile else "-"
    if column == "profile_nm":  # [[n, m] or None per block] (or "n:m" strings)
        patterns = {p if isinstance(p, str) else f"{p[0]}:{p[1]}" for p in json_value(value) or [] if p}
        return " ".join(sorted(patterns)) or "-"
    return fmt(value, ".4g")


def _zero_shot_tasks(rows: list[dict]) -> list[str]:
    return sorted({task for row in rows for task in (json_value(row.get("zero_shot")) or {})})


def sweep_tables(rows: list[dict]) -> tuple[Table, Table]:
    """The summary of the chosen rows (sorted) and the full table (every row, parquet order)."""
    tasks = _zero_shot_tasks(rows)
    chosen = sorted((r for r in rows if r.get("chosen")),
                    key=lambda r: (r["model"], r["pruner"], target_key(r["target"]), method_key(r["method"])))
    summary = Table("Chosen profiles", ["model", "target", "pruner", "method", "candidate", "validation ppl",
                                        "test ppl", "search tokens", "search seconds", *tasks],
                    [[r["model"], r["target"], r["pruner"], r["method"], fmt(r.get("candidate")),
                      fmt(r.get("validation_perplexity")), fmt(r.get("test_perplexity")), fmt(r.get("search_tokens")),
                      fmt(r.get("search_seconds"), ".1f"),
                      *[fmt((json_value(r.get("zero_shot")) or {}).get(t), ".4f") for t in tasks]] for r in chosen],
                    "One row per cell: each method's pick. Perplexities on held-out validation and test windows; "
                    "zero-shot columns are accuracies." if tasks else
                    "One row per cell: each method's pick. Perplexities on held-out validation and test windows.")
    columns = [c for c in (rows[0] if rows else {}) if c not in ("protocol", "zero_shot")]
    full = Table("Every final pass", [*(c.replace("_", " ") for c in columns), *tasks],
                 [[_cell(c, r.get(c)) for c in columns]
                  + [fmt((json_value(r.get("zero_shot")) or {}).get(t), ".4f") for t in tasks] for r in rows],
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
    for row in sorted(chosen, key=lambda r: (r["model"], target_key(r["target"]), method_key(r["method"]))):
        profile = json_value(row.get("profile"))
        if profile:
            label = f"{row['method']} / {row['pruner']}" if several_pruners else row["method"]
            panels.setdefault(f"{row['model']} @ {row['target']}", {})[label] = profile
    return panels


def sweep_report(path: Path) -> Report:
    """A sweep directory (table.parquet, sweep.json, cells/, models/) as a report."""
    rows = pq.read_table(path / "table.parquet").to_pylist()
    chosen = [r for r in rows if r.get("chosen")]
    meta = read_json(path / "sweep.json")
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
        plots.append(convergence_plot(results_rows(path / folder), "Cell " + ", ".join(str(c.get("id")) for c in group),
                                      "", fitness_tokens((meta or {}).get("identity"))))
        if shapley_details(path / folder):
            shapley.setdefault(model_slug(str(group[0].get("model"))), shapley_details(path / folder))
    if any(plots):
        caption = Text("", CONVERGENCE_CAPTION, code=False)
        sections.append(Section("Search convergence", [caption, *filter(None, plots)]))
    models = sorted({p.parent.name for p in (path / "models").glob("*/sensitivities")} | set(shapley))
    for slug in models:
        items = sensitivity_items(sensitivity_records(path / "models" / slug / "sensitivities"), shapley.get(slug),
                                  label=slug)
        if items:
            sections.append(Section(f"Sensitivities: {slug}", items))
    sections.append(Section("Full table", [full]))
    protocols = list(dict.fromkeys(r["protocol"] for r in rows if r.get("protocol")))
    texts = [Text(f"Protocol {i + 1}" if len(protocols) > 1 else "Protocol", json.dumps(json_value(p), indent=2))
             for i, p in enumerate(protocols)]
    if meta and meta.get("spec"):
        texts.append(Text("Sweep spec", json.dumps(meta["spec"], indent=2)))
    if texts:
        sections.append(Section("Protocol and spec", texts))
    return Report(f"Sweep report: {path.resolve().name}", path, sections)


# --- a search run ----------------------------------------------------------------------------

def search_report(path: Path) -> Report:
    """A search run directory (summary.json, config.json, results/, best-*.json) as a report."""
    summary = read_json(path / "summary.json") or {}
    config = read_json(path / "config.json") or {}
    sections = []
    settings = config.get("config") or {}
    run_rows = [[k.replace("_", " "), fmt(settings[k], ".4g")] for k in
                ("model", "data", "method", "sparsity", "pruner", "budget_evals", "budget_tokens", "budget_minutes", "seed")
                if settings.get(k) is not None]
    labels = {"winner": ("winner", "s"), "winner_test_perplexity": ("winner test perplexity", ".2f"),
              "dense_test_perplexity": ("dense test perplexity", ".2f"),
              "atp_test_perplexity": ("best ATP test perplexity", ".2f"), "winner_vs_atp": ("winner vs ATP", "+.1%"),
              "uniform_test_perplexity": ("uniform test perplexity", ".2f"),
              "winner_vs_uniform": ("winner vs uniform", "+.1%"),
              "device": ("device", "s"), "dtype": ("dtype", "s")}
    run_rows += [[label, fmt(summary[k], spec)] for k, (label, spec) in labels.items() if k in summary]
    drivers = {**(summary.get("drivers") or {}), **(summary.get("baselines") or {})}  # baselines: uniform
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
            profiles[file.stem.removeprefix("best-")] = _block_view(file)
        except SparseAllocError:
            continue
    for name, d in drivers.items():
        if name not in profiles and d.get("profile"):
            profiles[name] = d["profile"]
    if profiles:  # the drivers' bests and the uniform baseline
        winner = summary.get("winner")
        headline = {f"{label} ({name})" if label != name else name: profiles[name]
                    for label, name in (("uniform", "uniform"), ("ATP pick", "tune-atp"), ("winner", winner))
                    if name in profiles}
        plots = [Plot("Winner against uniform and the ATP pick", lines_figure({"": headline}, "block", "sparsity"),
                      "The winner's per-block sparsities beside uniform and Tune's ATP pick, all at the target "
                      "mean.")] if winner in profiles and len(headline) > 1 else []
        plots.append(Plot("Best profile of each driver", lines_figure({"": profiles}, "block", "sparsity"),
                          "Each driver's best per-block sparsities (by validation KL; a per-group or per-linear "
                          "profile by its block means)."))
        sections.append(Section("Per-block profiles", plots))
    rows = results_rows(path)
    plot = convergence_plot(rows, all_tokens=fitness_tokens(settings))
    if plot:
        sections.append(Section("Search convergence", [plot]))
    trials = trials_plot(rows, max((len((d.get("details") or {}).get("rungs") or []) for d in drivers.values()),
                                   default=0) or None)
    if trials:
        sections.append(Section("Tune trials", [trials]))
    records = sensitivity_records(path / "sensitivities")
    fisher = ((drivers.get("evolution") or {}).get("details") or {}).get("fisher")  # evolution's seeds use them
    if "fisher" not in records and isinstance(fisher, list):
        records["fisher"] = {"values": fisher}
    items = sensitivity_items(records, shapley_details(path))
    if items:
        sections.append(Section("Sensitivities", items))
    return Report(f"Search report: {path.resolve().name}", path, sections)


# --- a prune output --------------------------------------------------------------------------

def _flat(data: dict, prefix: str = "") -> list[list[str]]:
    """Nested dict → [key.path, value] rows (lists as JSON)."""
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", json.dumps(value) if isinstance(value, list) else fmt(value, ".6g")])
    return rows


def _block_view(file: Path) -> list[float]:
    """A profile file's per-block sparsities: its entries, or for a finer profile its recorded block means."""
    profile, _ = read_profile(file)
    if profile.granularity == "block":
        return list(profile.sparsities)
    means = (read_json(file) or {}).get("block_means")
    if not means:
        raise SparseAllocError(f"{file} holds a per-{profile.granularity} profile without its block means")
    return list(means)


def prune_report(path: Path) -> Report:
    """A prune output (metrics.json, profile.json) as a report."""
    metrics = read_json(path / "metrics.json") or {}
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
    series = {}
    try:
        series["profile"] = _block_view(path / "profile.json")
    except SparseAllocError:
        pass
    if isinstance(achieved, dict) and achieved.get("per_block") and \
            len(achieved["per_block"]) == len(series.get("profile", achieved["per_block"])):
        series["achieved"] = achieved["per_block"]
    plot = Plot("Per-block profile", lines_figure({"": series}, "block", "sparsity"),
                "The profile's per-block sparsities (a finer profile's block means)" + (" and the zeros measured after the pass"
                                                        if "achieved" in series else ""))
    return Report(f"Prune report: {path.resolve().name}", path,
                  [Section("Final pass", tables), Section("Per-block profile", [plot])])

