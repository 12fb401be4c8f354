import json
import os

import pytest

from core import identity
from orchestrator.runtime.sensitivities import load_or_compute, sensitivity_path
from core.errors import SparseAllocError

IDENTITY = {"model": "tiny-llama", "data": "corpus.txt", "dtype": "fp32", "device_type": "cpu", "windows": 8,
            "seqlen": (16,)}


class Counting:
    def __init__(self, values):
        self.values, self.calls = values, 0

    def __call__(self):
        self.calls += 1
        return self.values


def test_second_call_with_same_identity_reuses_stored_values(tmp_path):
    compute = Counting([1.5, 2.0, 0.25])
    first = load_or_compute(tmp_path, "fisher", IDENTITY, compute)
    second = load_or_compute(tmp_path, "fisher", dict(IDENTITY), compute)
    assert first == second == [1.5, 2.0, 0.25] and compute.calls == 1
    record = json.loads((tmp_path / "sensitivities" / "fisher.json").read_text())
    assert record["values"] == [1.5, 2.0, 0.25] and record["identity"]["model"] == "tiny-llama"
    assert record["seconds"] >= 0
    # names are separate files
    assert load_or_compute(tmp_path, "shapley", IDENTITY, Counting([3.0])) == [3.0]


@pytest.mark.parametrize("change", [{"dtype": "bf16"}, {"windows": 16}, {"extra": 1}])
def test_different_identity_is_refused_naming_the_field(tmp_path, change):
    compute = Counting([1.0, 2.0])
    load_or_compute(tmp_path, "fisher", IDENTITY, compute)
    field = next(iter(change))
    with pytest.raises(SparseAllocError, match=field):
        load_or_compute(tmp_path, "fisher", {**IDENTITY, **change}, compute)
    with pytest.raises(SparseAllocError, match="model"):
        load_or_compute(tmp_path, "fisher", {k: v for k, v in IDENTITY.items() if k != "model"}, compute)
    assert compute.calls == 1


def test_left_over_temporary_file_is_never_read(tmp_path):
    path = sensitivity_path(tmp_path, "fisher")
    path.parent.mkdir(parents=True)
    half = path.with_name(path.name + ".1234.deadbeef.tmp")
    half.write_text('{"values": [9.0, 9.0], "identity": {"model": "tiny-ll')
    compute = Counting([1.0, 2.0])
    assert load_or_compute(tmp_path, "fisher", IDENTITY, compute) == [1.0, 2.0] and compute.calls == 1
    assert json.loads(path.read_text())["values"] == [1.0, 2.0]


def test_crash_while_writing_leaves_no_file(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(identity.os, "replace", broken_replace)
    with pytest.raises(OSError):
        load_or_compute(tmp_path, "fisher", IDENTITY, Counting([1.0]))
    assert os.listdir(tmp_path / "sensitivities") == []


def test_compute_error_stores_nothing(tmp_path):
    def failing():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        load_or_compute(tmp_path, "fisher", IDENTITY, failing)
    assert not sensitivity_path(tmp_path, "fisher").exists()


def test_unreadable_file_and_bad_names_are_user_errors(tmp_path):
    path = sensitivity_path(tmp_path, "fisher")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(SparseAllocError, match="delete it"):
        load_or_compute(tmp_path, "fisher", IDENTITY, Counting([1.0]))
    with pytest.raises(SparseAllocError, match="plain file name"):
        load_or_compute(tmp_path, "../fisher", IDENTITY, Counting([1.0]))
