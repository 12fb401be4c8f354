"""The sweep specification (``sparsealloc sweep SPEC.yaml``): read, checked as a whole, expanded to cells.

A spec lists ``models``, target ``sparsities`` and/or ``nm`` patterns, ``pruners``, allocation
``methods`` and a ``budget`` (``evals`` / ``minutes`` / ``tokens``; ``per: search``, the default, gives
it to every search, ``per: sweep`` shares it among all of them), plus the CLI's protocol
options in snake_case. Every problem is collected and reported at once, before any work starts.
A cell is one (model, target, pruner, method); its id names its directory in the sweep.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from core.errors import SparseAllocError
from core.profile import parse_nm

BUDGET_KEYS = ("evals", "minutes", "tokens")
BUDGET_SCOPES = ("search", "sweep")  # budget.per: each search gets the budget, or all searches share it


@dataclass(frozen=True)
class ZeroShot:
    """lm-eval tasks run on every pruned model (data local, tasks under ``include``)."""

    tasks: tuple[str, ...] = ()
    include: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, checked spec. Protocol fields mean what the ``search`` flags of the same name mean."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    sparsities: tuple[float, ...] = ()
    nm: tuple[str, ...] = ()
    pruners: tuple[str, ...] = ("wanda",)
    budget: dict = field(default_factory=dict)
    data: str = "default"
    text_field: str | None = None
    seqlen: int = 512
    calib_samples: int = 32
    eval_windows: int | None = 32
    fitness_windows: int = 8
    fitness_seqlen: int = 128
    selection_windows: int = 8
    fidelities: tuple[int, ...] = (256, 1024)
    top_fitness: str = "kl-seq"
    sequential_windows: int = 4
    finalists: int = 2
    estimator: str = "permutation"
    free_sampler: str = "tpe"
    atp_grid: int = 5
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    batch_size: int = 4
    population: int = 8
    actors: int | None = None
    threads: int = 1
    address: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    evaluator: str = "auto"
    device_memory_gb: float | None = None
    gpus_per_actor: int = 1
    seed: int = 0
    save_models: bool = False
    zero_shot: ZeroShot = ZeroShot()

    def targets(self) -> list[str]:
        """Every target as the table spells it: ``"0.7"`` or ``"2:4"``."""
        return [format_sparsity(s) for s in self.sparsities] + list(self.nm)

    def cells(self) -> list["Cell"]:
        """Every (model, target, pruner, method), models outermost (one evaluator pool per model)."""
        return [Cell(model, target, pruner, method) for model in self.models for target in self.targets()
                for pruner in self.pruners for method in self.methods]

    def to_json(self) -> dict:
        """Every field as plain JSON values."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def identity(self) -> dict:
        """What a resumed sweep must share with the original: everything but the cell lists, the
        budget and the run-time placement (a sweep may grow by models, targets, pruners or methods,
        and its budget may change for the searches still to run, as a search's may)."""
        skip = {"models", "methods", "sparsities", "nm", "pruners", "budget", "actors", "threads", "address",
                "save_models"}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in skip}


@dataclass(frozen=True)
class Cell:
    """One (model, target, pruner, method) of a sweep."""

    model: str
    target: str  # "0.7" or "2:4"
    pruner: str
    method: str

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.target) if ":" in self.target else None

    @property
    def sparsity(self) -> float:
        nm = self.nm
        return nm[0] / nm[1] if nm else float(self.target)

    @property
    def id(self) -> str:
        return "--".join(_slug(part) for part in (self.model, self.target, self.pruner, self.method))


def format_sparsity(value: float) -> str:
    return f"{value:g}"


def model_slug(model: str) -> str:
    """A file-name-safe name for ``model`` (a hub id, a path or ``default``)."""
    return _slug(model)


def _slug(text: str) -> str:
    tail = str(text).rstrip("/").split("/")[-2:] if "/" in str(text) else [str(text)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(tail)) or "x"


def _plain(value):
    if isinstance(value, ZeroShot):
        return {"tasks": list(value.tasks), "include": value.include, "limit": value.limit}
    return list(value) if isinstance(value, tuple) else value


_FIELDS = {f.name: f for f in fields(SweepSpec)}
_INTS = {"seqlen", "calib_samples", "eval_windows", "fitness_windows", "fitness_seqlen", "selection_windows",
         "finalists", "sequential_windows", "atp_grid", "batch_size", "population", "actors", "threads", "gpus_per_actor", "seed"}
_FLOATS = {"owl_m", "owl_lambda", "device_memory_gb"}
_STRINGS = {"data", "text_field", "estimator", "top_fitness", "free_sampler", "address", "device", "dtype", "evaluator"}
_CHOICES = {"estimator": ("permutation", "sliding"), "top_fitness": ("kl-seq", "kl"), "free_sampler": ("tpe", "cmaes"),
            "dtype": ("auto", "fp32", "bf16", "fp16"), "evaluator": ("auto", "resident", "streamed")}
_NULLABLE = {"eval_windows", "actors", "device_memory_gb", "text_field", "address"}


def _as_list(raw: dict, key: str, problems: list[str]) -> list:
    value = raw.get(key)
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, list):
        problems.append(f"{key}: expected a list, got {type(value).__name__}")
        return []
    return value


def _check_scalar(key: str, value, problems: list[str]):
    """``value`` converted to the field's type, or None with a problem recorded."""
    if value is None:
        if key not in _NULLABLE:
            problems.append(f"{key}: must not be empty")
        return None
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
            return None
        if value < (0 if key == "seed" else 1):
            problems.append(f"{key}: must be at least {0 if key == 'seed' else 1}, got {value}")
            return None
        return value
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(f"{key}: expected a non-negative number, got {value!r}")
            return None
        return float(value)
    if key in _STRINGS:
        value = str(value)
        if key in _CHOICES and value not in _CHOICES[key]:
            problems.append(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
            return None
        return value
    if key == "save_models":
        if not isinstance(value, bool):
            problems.append(f"save_models: expected true or false, got {value!r}")
            return None
        return value
    return value


def parse_spec(raw: dict, methods: dict[str, bool], pruner_names: list[str], can_load=None) -> SweepSpec:
    """Check a spec (a dict, as read from YAML) and build it; raises one error listing every problem.

    ``methods``: the registered method names, each with whether it searches (needs a budget);
    ``pruner_names``: the registered pruners. ``can_load(model) -> str | None``: why a
    model cannot be loaded (None when it can); skipped when not given."""
    if not isinstance(raw, dict):
        raise SparseAllocError(f"a sweep spec is a YAML mapping of keys (models, sparsities, …), got "
                               f"{type(raw).__name__}")
    problems: list[str] = []
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        problems.append(f"unknown keys: {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    models = [str(m) for m in _as_list(raw, "models", problems)]
    if not models:
        problems.append("models: list at least one model ('default', a Hugging Face id, a directory or a .gguf)")
    sparsities: list[float] = []
    for value in _as_list(raw, "sparsities", problems):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            problems.append(f"sparsities: {value!r} is not a sparsity in [0, 1)")
        else:
            sparsities.append(float(value))
    nm: list[str] = []
    for value in _as_list(raw, "nm", problems):
        if isinstance(value, int):  # YAML reads an unquoted 2:4 as the base-60 number 124
            problems.append(f"nm: {value} is a number; quote N:M patterns in YAML, e.g. \"2:4\"")
            continue
        try:
            n, m = parse_nm(str(value))
            nm.append(f"{n}:{m}")
        except SparseAllocError as exc:
            problems.append(f"nm: {exc}")
    if not sparsities and not nm and not any(p.startswith(("sparsities", "nm")) for p in problems):
        problems.append("sparsities: give at least one target sparsity (or nm: patterns)")
    pruners = [str(p) for p in _as_list(raw, "pruners", problems)] or ["wanda"]
    for pruner in pruners:
        if pruner not in pruner_names:
            problems.append(f"pruners: unknown pruner {pruner!r} (choose from {', '.join(pruner_names)})")
    method_names = list(methods)
    chosen = [str(m) for m in _as_list(raw, "methods", problems)]
    if not chosen:
        problems.append(f"methods: list at least one of {', '.join(method_names)}")
    for method in chosen:
        if method not in methods:
            problems.append(f"methods: unknown method {method!r} (choose from {', '.join(method_names)})")
    slugs = [model_slug(m) for m in models]
    clashing = sorted({m for m, slug in zip(models, slugs) if slugs.count(slug) > 1 and models.count(m) == 1})
    if clashing:
        problems.append(f"models: {', '.join(clashing)} would share one directory name; give them distinct last "
                        "path components")
    for name, values in (("models", models), ("sparsities", sparsities), ("nm", nm), ("pruners", pruners),
                         ("methods", chosen)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            problems.append(f"{name}: listed more than once: {', '.join(repeated)}")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict):
        problems.append("budget: expected a mapping with evals, minutes and/or tokens")
        budget = {}
    for key, value in budget.items():
        if key == "per":
            if value not in BUDGET_SCOPES:
                problems.append(f"budget.per: {value!r} is not one of {', '.join(BUDGET_SCOPES)}")
        elif key not in BUDGET_KEYS:
            problems.append(f"budget: unknown key {key!r} (use {', '.join(BUDGET_KEYS)} and per)")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"budget.{key}: expected a positive number, got {value!r}")
    searching = [m for m in chosen if methods.get(m)]
    if searching and not set(budget) & set(BUDGET_KEYS):
        problems.append(f"budget: methods {', '.join(searching)} search; give budget: evals, minutes and/or tokens")
    values: dict = {}
    for key, value in raw.items():
        if key in _INTS | _FLOATS | _STRINGS | {"save_models"}:
            checked = _check_scalar(key, value, problems)
            if checked is not None or (value is None and key in _NULLABLE):
                values[key] = checked
    fidelities = _as_list(raw, "fidelities", problems)
    if fidelities and not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in fidelities):
        problems.append(f"fidelities: expected positive token counts, got {fidelities!r}")
    elif fidelities:
        values["fidelities"] = tuple(fidelities)
    zero_shot = _zero_shot(raw.get("zero_shot"), problems)
    if can_load is not None:
        for model in models:
            reason = can_load(model)
            if reason:
                problems.append(f"models: {model!r} cannot be loaded: {reason}")
    if problems:
        raise SparseAllocError("the sweep spec has " + (f"{len(problems)} problems" if len(problems) > 1 else
                                                        "a problem") + ":\n  - " + "\n  - ".join(problems))
    return SweepSpec(models=tuple(models), methods=tuple(chosen), sparsities=tuple(sparsities), nm=tuple(nm),
                     pruners=tuple(pruners), budget=dict(budget), zero_shot=zero_shot, **values)


def _zero_shot(raw, problems: list[str]) -> ZeroShot:
    if raw is None:
        return ZeroShot()
    if not isinstance(raw, dict) or set(raw) - {"tasks", "include", "limit"}:
        problems.append("zero_shot: expected a mapping with tasks (list), include (directory) and limit (int)")
        return ZeroShot()
    tasks = raw.get("tasks") or []
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not tasks or not all(isinstance(t, str) for t in tasks):
        problems.append("zero_shot.tasks: list the lm-eval task names")
    include = raw.get("include")
    if include is not None and not Path(str(include)).expanduser().is_dir():
        problems.append(f"zero_shot.include: {include} is not a directory")
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"zero_shot.limit: expected a positive integer, got {limit!r}")
    return ZeroShot(tuple(str(t) for t in tasks), None if include is None else str(include), limit)


def read_spec(path: Path, methods: dict[str, bool], pruner_names: list[str], can_load=None) -> SweepSpec:
    """Read and check the YAML spec at ``path``."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SparseAllocError(f"cannot read the sweep spec {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SparseAllocError(f"{path} is not valid YAML: {exc}") from exc
    return parse_spec(raw, methods, pruner_names, can_load)
