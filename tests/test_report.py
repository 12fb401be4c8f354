"""`sparsealloc report`: HTML + markdown reports of a sweep, a search run and a prune output, built
from hand-written directories (no model, no Ray)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.errors import SparseAllocError
from core.profile import Profile, write_profile
from orchestrator import report
from orchestrator.report.sections import convergence
from orchestrator.cli import main
from orchestrator.runtime.results import ResultsTable

PROTOCOL = json.dumps({"seqlen": 128, "test": {"windows": 4}})


def _row(cell, target, method, candidate, chosen, profile, test_ppl, nm=None, zero_shot=None):
    sparsity = 0.5 if target == "2:4" else float(target)
    return {"cell": cell, "model": "tiny", "target": target, "sparsity": sparsity, "nm": nm, "pruner": "wanda",
            "method": method, "candidate": candidate, "chosen": chosen, "profile": json.dumps(profile),
            "profile_nm": json.dumps([[2, 4]] * 4) if nm else None, "achieved_sparsity": sparsity - 0.0001,
            "validation_perplexity": test_ppl * 0.95, "test_perplexity": test_ppl, "dense_test_perplexity": 21.5,
            "search_tokens": 0 if method == "uniform" else 81920,
            "search_seconds": 0.0 if method == "uniform" else 12.5,
            "search_evaluations": 0 if method == "uniform" else 40, "pass_seconds": 3.25,
            "zero_shot": json.dumps(zero_shot) if zero_shot else None, "protocol": PROTOCOL, "device": "cpu",
            "dtype": "fp32", "reused": False}


SWEEP_ROWS = [
    _row("tiny-0.5-wanda-uniform", "0.5", "uniform", "uniform", True, [0.5] * 4, 35.125,
         zero_shot={"arc_easy": 0.41, "piqa": 0.6}),
    _row("tiny-0.5-wanda-atp", "0.5", "atp", "beta=0.025", True, [0.45, 0.48, 0.52, 0.55], 33.875),
    _row("tiny-0.7-wanda-uniform", "0.7", "uniform", "uniform", True, [0.7] * 4, 412.5),
    _row("tiny-0.7-wanda-atp", "0.7", "atp", "beta=0.0125", False, [0.68, 0.69, 0.71, 0.72], 377.75),
    _row("tiny-0.7-wanda-atp", "0.7", "atp", "beta=0.05", True, [0.62, 0.66, 0.74, 0.78], 301.0625),
    _row("tiny-0.7-wanda-shapley-map", "0.7", "shapley-map", "strength=1", True, [0.6, 0.68, 0.74, 0.78], 290.5),
    _row("tiny-2:4-wanda-uniform", "2:4", "uniform", "uniform", True, [0.5] * 4, 88.5, nm="2:4"),
]


def _results_rows(driver: str, scale: float) -> list[dict]:
    """A driver's evaluations: low-fidelity and other draws (cost only) around top-fidelity draw-0 rows."""
    rows = []
    for i, fitness in enumerate([3.0, 2.5, 2.8, 1.9, 2.1]):
        rows.append({"driver": driver, "key": f"{driver}-{i}", "params": {}, "sparsities": [0.7] * 4, "nm": None,
                     "fitness": fitness * scale, "tokens": 1024, "draw": 0, "metric": "kl", "seconds": 0.5,
                     "node": "n", "actor": "a"})
        rows.append({"driver": driver, "key": f"{driver}-{i}-low", "params": {}, "sparsities": [0.7] * 4, "nm": None,
                     "fitness": 0.01, "tokens": 256, "draw": 0, "metric": "kl", "seconds": 0.1, "node": "n",
                     "actor": "a"})
    return rows


SHAPLEY = {"values": [0.4, 0.2, 0.1, 0.3], "stderr": [0.05, None, 0.02, 0.03]}


def _sensitivities(folder: Path) -> None:
    """Fisher traces and OWL ratios as orchestrator.sensitivity_store writes them."""
    folder.mkdir(parents=True)
    records = {"fisher": {"values": [4.0, 2.0, 1.0, 0.5]},
               "owl-M5": {"values": [0.01, 0.02, 0.03, 0.02]}, "owl-M7": {"values": [0.005, 0.01, 0.02, 0.01]}}
    for name, record in records.items():
        (folder / f"{name}.json").write_text(json.dumps({"name": name, "identity": {}, **record}))


def make_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    pq.write_table(pa.Table.from_pylist(SWEEP_ROWS), sweep / "table.parquet")
    cells = [{"id": r["cell"], "model": "tiny", "target": r["target"], "pruner": "wanda", "method": r["method"],
              "dir": f"cells/{r['cell']}" if r["method"] == "shapley-map" else None}
             for r in SWEEP_ROWS if r["chosen"]]
    (sweep / "sweep.json").write_text(json.dumps({"spec": {"models": ["tiny"], "targets": ["0.5", "0.7", "2:4"]},
                                                  "cells": cells}))
    search = sweep / "cells" / "tiny-0.7-wanda-shapley-map"  # the one cell that searched
    ResultsTable(search, "r").append_many(_results_rows("shapley", 1.0))
    (search / "summary.json").write_text(json.dumps({"drivers": {"shapley": {"details": SHAPLEY}}}))
    _sensitivities(sweep / "models" / "tiny" / "sensitivities")
    return sweep


def make_search_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    table = ResultsTable(run, "r")
    table.append_many([{**_results_rows("setup", 1.0)[0], "key": "probe"}])
    for driver, scale in (("evolution", 0.8), ("shapley", 1.2), ("tune-atp", 1.0)):
        table.append_many(_results_rows(driver, scale))
    profiles = {"evolution": [0.6, 0.65, 0.75, 0.8], "shapley": [0.62, 0.7, 0.7, 0.78], "tune-atp": [0.64, 0.68,
                                                                                                       0.72, 0.76]}
    for name, sparsities in profiles.items():
        write_profile(run / f"best-{name}.json", Profile(tuple(sparsities)), 0.7, driver=name, fitness=1.0)
    summary = {
        "winner": "evolution", "winner_test_perplexity": 250.25, "dense_test_perplexity": 21.5,
        "drivers": {name: {"validation_kl": 1.5 + i, "evaluations": 10, "seconds": 30.0 + i, "profile": p,
                           "details": SHAPLEY if name == "shapley" else {}}
                    for i, (name, p) in enumerate(profiles.items())},
        "final_passes": {"evolution": {"validation_perplexity": 240.5, "test_perplexity": 250.25},
                         "tune-atp": {"validation_perplexity": 260.0, "test_perplexity": 271.125}},
        "atp_test_perplexity": 271.125, "winner_vs_atp": 250.25 / 271.125 - 1, "device": "cpu", "dtype": "fp32",
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.json").write_text(json.dumps({"run_id": "r", "identity": {}, "config": {
        "model": "tiny", "method": "all", "sparsity": 0.7, "pruner": "wanda", "budget_evals": 40}}))
    _sensitivities(run / "sensitivities")
    return run


def make_prune_output(tmp_path: Path) -> Path:
    out = tmp_path / "pruned"
    out.mkdir()
    profile = Profile((0.6, 0.65, 0.75, 0.8))
    write_profile(out / "profile.json", profile, 0.7, pruner="wanda", model="tiny")
    metrics = {"model": "tiny", "pruner": "wanda", "target_sparsity": 0.7, "dense_perplexity": 21.5,
               "pruned_perplexity": 250.25,
               "achieved_sparsity": {"overall": 0.6999, "per_block": [0.6, 0.65, 0.75, 0.8]},
               "profile": profile.to_json(), "protocol": json.loads(PROTOCOL), "device": "cpu", "device_name": "x86",
               "dtype": "fp32", "offload": False, "seed": 0, "timings": {"load_s": 1.0, "prune_s": 2.5},
               "zero_shot": {"arc_easy": 0.4125, "piqa": 0.5875}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    return make_sweep(tmp_path)


@pytest.fixture
def search_dir(tmp_path) -> Path:
    return make_search_run(tmp_path)


@pytest.fixture
def prune_dir(tmp_path) -> Path:
    return make_prune_output(tmp_path)


class _Tables(HTMLParser):
    """Every <table> of a page (rows of cell texts) under the title of the <h3> before it, and the <img> sources."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._title, self._text, self._cell = {}, [], "", None, None

    def handle_starttag(self, tag, attrs):
        if tag == "h3":
            self._text = ""
        elif tag == "table":
            self.tables[self._title] = []
        elif tag == "tr":
            self.tables[self._title].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag == "h3":
            self._title, self._text = self._text, None
        elif tag in ("td", "th"):
            self.tables[self._title][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._text is not None:
            self._text += data
        if self._cell is not None:
            self._cell += data


def _parse_html(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text())
    return parser


def _md_tables(path: Path) -> dict[str, list[list[str]]]:
    """The markdown's tables (header and body rows, separator dropped) under their ### titles."""
    tables, title = {}, ""
    for line in path.read_text().splitlines():
        if line.startswith("### "):
            title = line[4:]
        elif line.startswith("|") and not re.fullmatch(r"\|(-+:?\|)+", line):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            tables.setdefault(title, []).append(cells)
    return tables


def _check_png(data: bytes) -> None:
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), "not a whole PNG"
    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    assert 300 <= image.width <= 4000 and 200 <= image.height <= 4000, image.size


def _check_images(html_path: Path, md_path: Path) -> int:
    """Every embedded HTML image and every linked markdown image decodes to a sensible PNG; the same count."""
    page = html_path.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page), "the page must load nothing from outside"
    sources = _parse_html(html_path).images
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        _check_png(base64.b64decode(src.split(",", 1)[1], validate=True))
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    for link in links:
        assert link.startswith(f"{report.FILES_DIR}/") and not Path(link).is_absolute()
        _check_png((md_path.parent / link).read_bytes())
    assert len(sources) == len(links)
    return len(sources)


def _column(table: list[list[str]], name: str) -> list[str]:
    index = table[0].index(name)
    return [row[index] for row in table[1:]]


def test_sweep_report(sweep_dir):
    html_path, md_path = report.write_report(sweep_dir)
    assert (html_path, md_path) == report.report_paths(sweep_dir) == (sweep_dir / "report.html",
                                                                       sweep_dir / "report.md")
    # perplexity, profiles, one convergence (the cell with a dir), Shapley, Fisher, OWL
    assert _check_images(html_path, md_path) == 6
    rows = pq.read_table(sweep_dir / "table.parquet").to_pylist()
    chosen = [r for r in rows if r["chosen"]]
    for tables in (_parse_html(html_path).tables, _md_tables(md_path)):
        full = tables["Every final pass"]
        assert len(full) == 1 + len(rows)
        assert _column(full, "test perplexity") == [f"{r['test_perplexity']:.2f}" for r in rows]
        assert _column(full, "cell") == [r["cell"] for r in rows]
        assert _column(full, "candidate") == [r["candidate"] for r in rows]
        assert _column(full, "chosen") == ["yes" if r["chosen"] else "no" for r in rows]
        assert _column(full, "arc_easy") == ["0.4100"] + ["-"] * (len(rows) - 1)
        summary = tables["Chosen profiles"]
        got = sorted(zip(_column(summary, "target"), _column(summary, "method"), _column(summary, "test ppl"),
                         _column(summary, "validation ppl")))
        assert got == sorted((r["target"], r["method"], f"{r['test_perplexity']:.2f}",
                              f"{r['validation_perplexity']:.2f}") for r in chosen)
        assert _column(summary, "target") == ["0.5", "0.5", "0.7", "0.7", "0.7", "2:4"]  # by value, N:M last
        assert _column(full, "profile nm") == ["-"] * (len(rows) - 1) + ["2:4"]
        assert "beta=0.0125" not in _column(summary, "candidate")
    text = md_path.read_text()
    for title in ("Perplexity versus sparsity", "Per-block profiles", "Search convergence", "Sensitivities: tiny",
                  "Full table", "Protocol and spec"):
        assert f"## {title}" in text


def test_sweep_sections_without_data_are_left_out(sweep_dir):
    report.write_report(sweep_dir)  # a first report with every section; the second must not keep its PNGs
    shutil.rmtree(sweep_dir / "models")
    shutil.rmtree(sweep_dir / "cells")
    (sweep_dir / "sweep.json").unlink()
    html_path, md_path = report.write_report(sweep_dir)
    assert _check_images(html_path, md_path) == 2
    assert "Sensitivities" not in md_path.read_text() and "Search convergence" not in md_path.read_text()
    assert len(list((sweep_dir / report.FILES_DIR).iterdir())) == 2, "PNGs of the earlier report stay behind"


def test_search_report(search_dir):
    html_path, md_path = report.write_report(search_dir)
    assert _check_images(html_path, md_path) == 6  # winner vs ATP, profiles, convergence, Shapley, Fisher, OWL
    summary = json.loads((search_dir / "summary.json").read_text())
    for tables in (_parse_html(html_path).tables, _md_tables(md_path)):
        finalists = tables["Finalists"]
        assert _column(finalists, "driver") == list(summary["drivers"])
        assert _column(finalists, "validation KL") == [f"{d['validation_kl']:.4f}" for d in summary["drivers"].values()]
        assert _column(finalists, "test ppl") == ["250.25", "-", "271.12"]
        assert _column(finalists, "winner") == ["yes", "", ""]
        run = dict(tables["Run"][1:])
        assert run["model"] == "tiny" and run["winner"] == "evolution" and run["winner vs ATP"] == "-7.7%"
    assert "draw 0" in md_path.read_text()


def test_convergence_uses_only_comparable_rows():
    rows = _results_rows("evolution", 1.0) + [
        {"driver": "evolution", "fitness": 0.001, "tokens": 1024, "draw": 1, "metric": "kl", "seconds": 1.0},
        {"driver": "evolution", "fitness": 0.002, "tokens": 1024, "draw": 0, "metric": "ppl", "seconds": 1.0},
        {"driver": "evolution", "fitness": 0.004, "tokens": 1024, "draw": 0, "metric": "kl", "seconds": 1.0,
         "params": json.dumps({"coalition": [1]})},
        {"driver": "setup", "fitness": 0.003, "tokens": 1024, "draw": 0, "metric": "kl", "seconds": 1.0}]
    for i, row in enumerate(rows):
        row["timestamp"] = float(i)
    curves = convergence(rows)
    assert list(curves) == ["evolution"]
    curve = curves["evolution"]
    assert curve["best"] == [3.0, 2.5, 1.9, 1.9]  # improvements only; the low-fidelity 0.01 never counts
    assert curve["tokens"] == [1024, 1024 + 256 + 1024, 3 * (1024 + 256) + 1024, 5 * (1024 + 256) + 3 * 1024]
    assert curve["seconds"][-1] == pytest.approx(5 * 0.6 + 3.0)


def test_convergence_counts_all_tokens_as_the_largest_fidelity():
    rows = [{"driver": "evolution", "fitness": f, "tokens": t, "draw": d, "metric": "kl", "seconds": 1.0,
             "timestamp": float(i)} for i, (f, t, d) in enumerate([(2.0, 256, 7), (1.5, 1024, 0), (1.2, -1, 0),
                                                                   (1.1, None, 0)])]
    assert convergence(rows, all_tokens=1024)["evolution"]["best"] == [1.5, 1.2, 1.1, 1.1]
    assert convergence(rows, all_tokens=1024)["evolution"]["tokens"][-1] == 256 + 3 * 1024
    assert convergence(rows)["evolution"]["best"] == [1.2, 1.1, 1.1]  # unknown: "all" is the largest


def test_prune_report(prune_dir):
    html_path, md_path = report.write_report(prune_dir)
    assert _check_images(html_path, md_path) == 1
    for tables in (_parse_html(html_path).tables, _md_tables(md_path)):
        metrics = dict(tables["Metrics"][1:])
        assert metrics["pruned perplexity"] == "250.25" and metrics["dense perplexity"] == "21.50"
        assert metrics["achieved sparsity"] == "0.6999" and metrics["prune seconds"] == "2.5"
        assert dict(tables["Zero-shot accuracy"][1:]) == {"arc_easy": "0.4125", "piqa": "0.5875"}
        assert dict(tables["Protocol"][1:])["test.windows"] == "4"


def test_a_directory_of_another_kind_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SparseAllocError, match="expected a sweep directory"):
        report.write_report(tmp_path)
    with pytest.raises(SparseAllocError, match="does not exist"):
        report.write_report(tmp_path / "missing")
    assert not (tmp_path / "report.html").exists()


def test_cli_report(sweep_dir, tmp_path, capsys):
    assert main(["report", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert str(sweep_dir / "report.html") in out and str(sweep_dir / "report.md") in out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium to render the page")
def test_the_page_renders_in_a_browser(sweep_dir, tmp_path):
    html_path, _ = report.write_report(sweep_dir)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--window-size=1400,2400", f"--screenshot={shot}",
                        html_path.as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    colors = image.getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50, "the screenshot is blank"
    assert image.getextrema()[0] < 100  # some dark text or lines on the light page
