"""The results table: unique part names, batched parts, dataset reads, duplicates shown, and the
`sparsealloc results` view of a run directory."""

import csv
import json
import os

import pyarrow.dataset as ds
import pytest

import orchestrator.runtime.results as results_module
from orchestrator.cli import main
from orchestrator.runtime.results import SCHEMA, ResultsTable


def _row(i: int, driver: str = "shapley", fitness: float | None = None) -> dict:
    sparsities = [0.5 + 0.01 * i, 0.6, 0.7, 0.6 - 0.01 * i]
    return {"driver": driver, "key": json.dumps([sparsities, None, 256, "kl"]), "params": {"i": i},
            "sparsities": sparsities, "nm": None, "fitness": float(i) if fitness is None else fitness,
            "tokens": 256, "draw": 0, "metric": "kl", "seconds": 0.25, "node": "f" * 56, "actor": f"host:{100 + i}"}


def _parts(table: ResultsTable) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in table.dir.iterdir() if p.name.startswith("part-")}


def test_a_deleted_part_never_makes_the_next_write_overwrite_one(tmp_path):
    table = ResultsTable(tmp_path, "run1")
    for i in range(3):
        table.append(_row(i))
    before = _parts(table)
    assert len(before) == 3
    first = sorted(before)[0]
    (table.dir / first).unlink()  # a lost part
    del before[first]

    again = ResultsTable(tmp_path, "run1")  # e.g. a resume
    again.append(_row(10))
    after = _parts(again)
    assert {name: after.get(name) for name in before} == before  # every surviving part untouched
    assert len(after) == 3
    assert len(again.read()) == 3 and len(again) == 3
    assert again.get(_row(10)["key"])["fitness"] == 10.0


def test_a_part_is_never_overwritten_even_when_its_name_repeats(tmp_path, monkeypatch):
    table = ResultsTable(tmp_path, "run1")
    monkeypatch.setattr(results_module.time, "time_ns", lambda: 42)
    monkeypatch.setattr(results_module.uuid, "uuid4", lambda: type("U", (), {"hex": "0" * 32})())
    table.append(_row(0))
    written = _parts(table)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        table.append(_row(1))
    assert _parts(table) == written
    assert sorted(os.listdir(table.dir)) == sorted(written)  # no temporary left behind
    assert [row["fitness"] for row in ResultsTable(tmp_path, "check").read()] == [0.0]


def test_leftover_partial_and_temporary_files_are_ignored(tmp_path):
    table = ResultsTable(tmp_path, "run1")
    table.append_many([_row(0), _row(1)])
    (table.dir / "part-000007.partial").write_bytes(b"PAR1 half a file")  # older naming, interrupted
    (table.dir / "part-run1-1-abc.parquet.partial").write_bytes(b"PAR1")
    (table.dir / ".tmp-part-run1-2-def.parquet").write_bytes(b"PAR1 torn")
    reread = ResultsTable(tmp_path, "run2")
    assert [row["fitness"] for row in reread.read()] == [0.0, 1.0]
    assert len(reread) == 2 and reread.duplicate_keys() == []
    reread.append(_row(2))
    assert len(ResultsTable(tmp_path, "check").read()) == 3


def test_an_interrupted_write_leaves_only_a_hidden_temporary(tmp_path, monkeypatch):
    table = ResultsTable(tmp_path, "run1")
    table.append(_row(0))

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(results_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        table.append(_row(1))
    monkeypatch.undo()
    leftovers = [name for name in os.listdir(table.dir) if not name.startswith("part-")]
    assert len(leftovers) == 1  # the complete-but-unpublished temporary
    # Neither our reader nor a plain pyarrow dataset over the folder sees it.
    assert len(ResultsTable(tmp_path, "check").read()) == 1
    assert ds.dataset(table.dir, format="parquet").to_table().num_rows == 1


def test_a_batch_is_one_part(tmp_path):
    table = ResultsTable(tmp_path, "run1")
    written = table.append_many([_row(i) for i in range(5)])
    assert len(_parts(table)) == 1
    assert {row["timestamp"] for row in written} == {written[0]["timestamp"]}
    assert table.append_many([]) == [] and len(_parts(table)) == 1
    table.append(_row(5))
    assert len(_parts(table)) == 2
    reread = ResultsTable(tmp_path, "check")
    assert [row["fitness"] for row in reread.read()] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(reread.get(_row(i)["key"])["fitness"] == i for i in range(6))
    assert all(row["run_id"] == "run1" and json.loads(row["params"]) == {"i": i}
               for i, row in enumerate(reread.read()))


def test_the_folder_reads_as_a_pyarrow_dataset(tmp_path):
    first, second = ResultsTable(tmp_path, "first"), ResultsTable(tmp_path, "second")
    first.append_many([_row(0), _row(1)])
    second.append(_row(2, driver="evolution"))
    first.append(_row(3))
    dataset = ds.dataset(tmp_path / "results", format="parquet")
    assert dataset.schema.equals(SCHEMA)
    table = dataset.to_table().sort_by("timestamp")
    assert table.num_rows == 4
    assert table.column("fitness").to_pylist() == [0.0, 1.0, 2.0, 3.0]
    assert table.column("run_id").to_pylist() == ["first", "first", "second", "first"]
    assert first.read_table().equals(table)


def test_a_duplicate_key_is_kept_and_detected(tmp_path):
    table = ResultsTable(tmp_path, "run1")
    table.append(_row(0, fitness=1.5))
    table.append(_row(1))
    assert table.duplicate_keys() == []
    table.append(_row(0, fitness=9.0))  # a re-evaluation: must never happen, must never hide
    key = _row(0)["key"]
    for view in (table, ResultsTable(tmp_path, "check")):
        assert view.duplicate_keys() == [key]
        assert len(view.read()) == 3 and len(view) == 2
        assert view.get(key)["fitness"] == 1.5  # the first answer stays the answer


def _two_runs(tmp_path):
    # run "zzz" writes first, run "aaa" second: file-name order and time order disagree.
    ResultsTable(tmp_path, "zzz").append_many([_row(0, "shapley"), _row(1, "evolution")])
    ResultsTable(tmp_path, "aaa").append(_row(2, "tune-atp"))


def test_results_command_prints_the_table_by_time(tmp_path, capsys):
    _two_runs(tmp_path)
    assert main(["results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["driver", "key", "tokens", "draw", "trial", "metric", "fitness", "seconds", "actor", "node"]
    assert [line.split()[0] for line in lines[1:4]] == ["shapley", "evolution", "tune-atp"]
    assert "0.600 [0.50-0.70]" in lines[1] and "host:100" in lines[1] and "f" * 12 in lines[1]
    assert "3 rows, 3 distinct keys" in out

    assert main(["results", str(tmp_path), "--driver", "evolution"]) == 0
    body = capsys.readouterr().out.splitlines()[1:]
    assert body[0].split()[0] == "evolution" and body[1] == "" and "1 rows" in body[2]

    assert main(["results", str(tmp_path), "--limit", "2"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:3]] == ["shapley", "evolution"]

    assert main(["results", str(tmp_path), "--driver", "nope"]) == 2
    assert "no rows of driver 'nope'" in capsys.readouterr().err


def test_results_command_writes_csv(tmp_path, capsys):
    _two_runs(tmp_path)
    target = tmp_path / "rows.csv"
    assert main(["results", str(tmp_path), "--csv", str(target)]) == 0
    assert f"3 rows written to {target}" in capsys.readouterr().out
    with open(target, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == SCHEMA.names
    assert [row["driver"] for row in rows] == ["shapley", "evolution", "tune-atp"]
    assert [row["run_id"] for row in rows] == ["zzz", "zzz", "aaa"]
    assert json.loads(rows[2]["sparsities"]) == _row(2)["sparsities"]
    assert float(rows[1]["fitness"]) == 1.0 and rows[0]["key"] == _row(0)["key"]


def test_results_command_on_a_run_without_results(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["results", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "holds no results" in err and "sparsealloc search" in err
    missing = tmp_path / "missing"
    assert main(["results", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()  # reading creates nothing
