"""The sweep specification (``sparsealloc sweep SPEC.yaml``): read, checked as a whole, expanded to cells.

A spec lists ``models``, target ``sparsities`` and/or ``nm`` patterns, ``pruners``, allocation
``methods`` and a ``budget`` (``evals`` / ``minutes`` / ``tokens``; ``per: search``, the default, gives
it to every search, ``per: sweep`` shares it among all of them), plus the CLI's protocol
options in snake_case. Every problem is collected and reported at once, before any work starts.
A cell is one (model, target, pruner, method); its id names its directory in the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from core.errors import SparseAllocError
from core.profile import parse_nm
from orchestrator.runtime.options import declared, in_sweep_identity, option, parse_value, sweep_default, sweep_keys
from orchestrator.runtime.rundir import model_slug, slug

BUDGET_KEYS = ("evals", "minutes", "tokens")
BUDGET_SCOPES = ("search", "sweep")  # budget.per: each search gets the budget, or all searches share it


@dataclass(frozen=True)
class ZeroShot:
    """lm-eval tasks run on every pruned model (data local, tasks under ``include``)."""

    tasks: tuple[str, ...] = ()
    include: str | None = None
    limit: int | None = None


def _search_keys() -> dict:
    """The search options a spec may set (snake_case, as ``search``'s flags), from their declaration."""
    from orchestrator.search.config import SearchConfig

    return sweep_keys(SearchConfig)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, checked spec. ``protocol`` holds the search options the spec sets or their sweep
    defaults (they mean what the ``search`` flags of the same name mean)."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    sparsities: tuple[float, ...] = ()
    nm: tuple[str, ...] = ()
    pruners: tuple[str, ...] = ("wanda",)
    budget: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    atp_grid: int = option(5, "ATP: this many slopes beta from 0 to its maximum, the pick chosen on validation",
                           minimum=1, sweep=True)
    owl_m: float = option(5.0, "OWL's outlier multiplier M", minimum=0, sweep=True)
    owl_lambda: float = option(0.08, "OWL's lambda", minimum=0, sweep=True)
    save_models: bool = option(False, "keep every pruned model (passes/<digest>/), not only its metrics",
                               sweep=True, identity=False)
    zero_shot: ZeroShot = ZeroShot()

    def targets(self) -> list[str]:
        """Every target as the table spells it: ``"0.7"`` or ``"2:4"``."""
        return [format_sparsity(s) for s in self.sparsities] + list(self.nm)

    def cells(self) -> list["Cell"]:
        """Every (model, target, pruner, method), models outermost (one evaluator pool per model)."""
        return [Cell(model, target, pruner, method) for model in self.models for target in self.targets()
                for pruner in self.pruners for method in self.methods]

    def to_json(self) -> dict:
        """Every field as plain JSON values (the protocol's options at the top level, as in a spec)."""
        values = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "protocol"}
        return {**values, **{k: _plain(v) for k, v in self.protocol.items()}}

    def identity(self) -> dict:
        """What a resumed sweep must share with the original: the protocol options that are part of a
        search's identity and the sweep's own settings, not the cell lists, the budget or the run-time
        placement (a sweep may grow by models, targets, pruners or methods, and its budget may change for
        the searches still to run, as a search's may)."""
        keys = _search_keys()
        identity = {k: _plain(v) for k, v in self.protocol.items() if in_sweep_identity(keys[k])}
        own = {item.name: _plain(getattr(self, item.name)) for item in declared(SweepSpec) if item.option.identity}
        return {**identity, **own, "zero_shot": _plain(self.zero_shot)}


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
        return "--".join(slug(part) for part in (self.model, self.target, self.pruner, self.method))


def format_sparsity(value: float) -> str:
    return f"{value:g}"


def _plain(value):
    if isinstance(value, ZeroShot):
        return {"tasks": list(value.tasks), "include": value.include, "limit": value.limit}
    return list(value) if isinstance(value, tuple) else value


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


def parse_spec(raw: dict, methods: dict[str, bool], pruner_names: list[str], can_load=None) -> SweepSpec:
    """Check a spec (a dict, as read from YAML) and build it; raises one error listing every problem.

    ``methods``: the registered method names, each with whether it searches (needs a budget);
    ``pruner_names``: the registered pruners. ``can_load(model) -> str | None``: why a
    model cannot be loaded (None when it can); skipped when not given."""
    if not isinstance(raw, dict):
        raise SparseAllocError(f"a sweep spec is a YAML mapping of keys (models, sparsities, …), got "
                               f"{type(raw).__name__}")
    problems: list[str] = []
    search_keys = _search_keys()
    own_keys = {item.name: item for item in declared(SweepSpec)}
    known = [f.name for f in fields(SweepSpec) if f.name != "protocol"] + list(search_keys)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        problems.append(f"unknown keys: {', '.join(unknown)} (known: {', '.join(known)})")
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
    clashing = sorted({m for m, name in zip(models, slugs) if slugs.count(name) > 1 and models.count(m) == 1})
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
    protocol = {name: sweep_default(item) for name, item in search_keys.items()}
    values: dict = {}
    for key, value in raw.items():
        item = search_keys.get(key) or own_keys.get(key)
        if item is None:
            continue
        checked, problem = parse_value(item, value)
        if problem:
            problems.append(f"{key}: {problem}")
        elif key in search_keys:
            protocol[key] = checked
        else:
            values[key] = checked
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
                     pruners=tuple(pruners), budget=dict(budget), protocol=protocol, zero_shot=zero_shot, **values)


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
