"""``sparsealloc report PATH``: one self-contained HTML page and its markdown twin for a sweep, a
search run or a prune output.

The data is read once into a :class:`Report` (:mod:`.builders`, from the pieces in :mod:`.model`,
:mod:`.figures` and :mod:`.sections`); :mod:`.render` writes ``PATH/report.html`` (every plot an
embedded base64 PNG, inline CSS, nothing external) and ``PATH/report.md`` (plots as
``PATH/report-files/*.png`` behind relative links, tables as markdown tables).
"""

from __future__ import annotations

import time
from pathlib import Path

from core.errors import SparseAllocError
from core.identity import write_atomic
from orchestrator.report.builders import prune_report, search_report, sweep_report
from orchestrator.report.model import Plot, Report
from orchestrator.report.render import anchor, render_html, render_markdown

HTML_NAME, MD_NAME, FILES_DIR = "report.html", "report.md", "report-files"


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
                name = f"{len(files) + 1:02d}-{anchor(f'{section.title} {item.title}')}.png"
                (folder / name).write_bytes(item.png)
                files[id(item)] = f"{FILES_DIR}/{name}"
    html_path, md_path = report_paths(path)
    write_atomic(html_path, render_html(report, generated))
    write_atomic(md_path, render_markdown(report, generated, files))
    return html_path, md_path
