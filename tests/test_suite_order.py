"""The suite's own scheduling: heavy tests head each xdist worker's first part."""

from conftest import pytest_collection_modifyitems


class _Item:
    def __init__(self, name: str, marker: str | None = None) -> None:
        self.name, self.marker = name, marker

    def get_closest_marker(self, name: str):
        return name if name == self.marker else None


def test_heavy_tests_head_the_parts_worksteal_sends_first(monkeypatch):
    items = [_Item(f"t{i}") for i in range(10)]
    items[4].marker, items[7].marker, items[9].marker, items[2].marker = "cluster", "real_model", "cluster", "cluster"
    before = list(items)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    pytest_collection_modifyitems(None, items)
    assert sorted(i.name for i in items) == sorted(i.name for i in before)  # every test once
    # worksteal's first split of 10 over 3 workers: 3, 3, 4 tests; each part starts with its heavy share
    assert [i.name for i in items] == ["t2", "t9", "t0", "t4", "t1", "t3", "t7", "t5", "t6", "t8"]


def test_order_untouched_without_xdist(monkeypatch):
    items = [_Item("a"), _Item("b", "cluster")]
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["a", "b"]
