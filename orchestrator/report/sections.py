"""Report pieces more than one builder uses: reading a run directory's files, the sensitivity plots and
the search's convergence plot."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from core.errors import SparseAllocError
from orchestrator.report.figures import bars_figure, lines_figure, trials_figure
from orchestrator.report.model import Plot, json_value
from orchestrator.runtime.results import UnreadablePart, load_run_results


def read_json(path: Path):
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shapley_details(run: Path) -> dict | None:
    """The shapley driver's values (and standard errors) in a run's summary.json, if it has them."""
    summary = read_json(run / "summary.json")
    drivers = summary.get("drivers") if isinstance(summary, dict) else None
    details = ((drivers or {}).get("shapley") or {}).get("details") or {}
    return details if details.get("values") else None


def results_rows(run: Path) -> list[dict]:
    """Every row of a run's results table (none when it has no results; an unreadable part is an error
    naming it)."""
    try:
        return load_run_results(run).to_pylist()
    except UnreadablePart:
        raise
    except SparseAllocError:
        return []


def sensitivity_records(folder: Path) -> dict[str, dict]:
    """``<name>.json`` records of a sensitivities folder (unreadable ones skipped)."""
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = read_json(path)
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


def fitness_tokens(settings: dict | None) -> int | None:
    """All fitness tokens of a run (``--fitness-windows`` x ``--fitness-seqlen``), when its settings say."""
    try:
        return int(settings["fitness_windows"]) * int(settings["fitness_seqlen"])
    except (KeyError, TypeError, ValueError):
        return None


def convergence(rows: list[dict], all_tokens: int | None = None) -> dict[str, dict[str, list[float]]]:
    """Best fitness so far per driver against its cumulative tokens and evaluator seconds. Only KL rows
    of draw 0 at the driver's largest token count count as fitness (comparable values), and no Shapley
    coalition (a profile off the target); every row's tokens and seconds count as cost. A row's tokens
    None or negative mean all fitness tokens: ``all_tokens`` (unknown: above every count). A Tune trial's
    rung (params with ``trial`` and ``skip``) ends at ``skip`` + its tokens and counts with the trial's
    running KL there."""
    by_driver: dict[str, list[dict]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.get("timestamp") or 0.0):
        if row.get("driver") and row["driver"] != "setup":
            by_driver[row["driver"]].append(row)
    out = {}
    for driver, driver_rows in by_driver.items():
        counts = [math.inf if t is None or t < 0 else t for t in (r.get("tokens") for r in driver_rows)]
        counts = [all_tokens if t == math.inf and all_tokens is not None else t for t in counts]
        params = [json_value(r.get("params")) or {} for r in driver_rows]
        params = [p if isinstance(p, dict) else {} for p in params]
        spans = [t + p.get("skip", 0) for t, p in zip(counts, params)]  # a Tune rung: the tokens up to its end
        top = max((t for t, r in zip(spans, driver_rows) if r.get("metric") == "kl"), default=None)
        largest = max((t for t in counts if t != math.inf), default=0)  # the cost of an "all" row, unknown
        tokens = seconds = 0.0
        best = math.inf
        running: dict[str, float] = {}  # a Tune trial's KL sum over its rungs so far
        curve: dict[str, list[float]] = {"tokens": [], "seconds": [], "best": []}
        for row, count, span, param in zip(driver_rows, counts, spans, params):
            tokens += largest if count == math.inf else count
            seconds += row.get("seconds") or 0.0
            fitness = row.get("fitness")
            if "trial" in param and fitness is not None and count != math.inf:
                running[param["trial"]] = running.get(param["trial"], 0.0) + fitness * count
                fitness = running[param["trial"]] / span
            comparable = (row.get("metric") == "kl" and (row.get("draw") or 0) == 0 and span == top
                          and "coalition" not in param)
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
    """Best fitness so far per driver by tokens and by evaluator seconds; None when no driver has one."""
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


TUNE_AXES = ("beta", "lam", "strength")  # the one hyper-parameter of tune-atp, tune-owl, tune-fisher


def tune_trials(rows: list[dict]) -> dict[str, dict]:
    """Per Tune driver, its trials from the results table: each trial's config, the last rung it reached and
    its running KL there (the KL over every token its rungs scored), in the order the trials started."""
    out: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r.get("timestamp") or 0.0):
        params = json_value(row.get("params")) or {}
        if not isinstance(params, dict) or "trial" not in params or row.get("fitness") is None:
            continue
        trial = out.setdefault(row["driver"], {}).setdefault(params["trial"], {"config": params, "rung": 0,
                                                                                 "sum": 0.0, "tokens": 0})
        trial["sum"] += row["fitness"] * (row.get("tokens") or 0)
        trial["tokens"] += row.get("tokens") or 0
        trial["rung"] = max(trial["rung"], int(params.get("rung", 0)))
    return out


TRIALS_CAPTION = ("Each Tune trial's hyper-parameter (for tune-free, the order the trials started) against its "
                  "running KL over the tokens its rungs scored, at the last rung it reached. Filled: trials that "
                  "reached the top rung; hollow: trials that ended at a lower rung, stopped by the scheduler "
                  "(ASHA keeps the best of each rung) or by the budget running out. KL over fewer tokens is "
                  "noisier, so a hollow point may lie below the filled ones.")


def trials_plot(rows: list[dict], rungs: int | None) -> Plot | None:
    """The report's figure of the Tune trials (None when the run has none)."""
    drivers = tune_trials(rows)
    if not drivers:
        return None
    top = rungs or max(t["rung"] for trials in drivers.values() for t in trials.values())
    panels = {}
    for driver, trials in drivers.items():
        axis = next((k for k in TUNE_AXES if all(k in t["config"] for t in trials.values())), None)
        points = [(t["config"][axis] if axis else index, t["sum"] / max(1, t["tokens"]), t["rung"])
                  for index, t in enumerate(trials.values())]
        panels[driver] = {"xlabel": axis or "trial (start order)", "points": points, "integer_x": axis is None}
    return Plot("Tune trials", trials_figure(panels, top), TRIALS_CAPTION)
