"""A report's data: sections of plots, tables and text, and how a table cell prints a value."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

METHOD_ORDER = ("uniform", "owl", "atp", "shapley-map", "fisher-map")


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


def json_value(text):
    """A JSON column's value (already decoded values pass through; None and bad JSON give None)."""
    if text is None or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def method_key(method: str) -> tuple:
    """Methods in :data:`METHOD_ORDER`, then any other by name."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def target_key(target: str) -> tuple:
    """Unstructured targets first, by value, then N:M patterns."""
    try:
        return (0, float(target), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(target))
