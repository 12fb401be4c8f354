"""Phase clocks kept in the run directory, and driver budgets that continue across a resume."""

import json
import time

import pytest

from orchestrator.runtime.clock import RunClock
from orchestrator.search.run import SearchConfig, _budget, _search_seconds
from core.errors import SparseAllocError


def test_phases_accumulate_across_sessions(tmp_path):
    clock = RunClock(tmp_path, tick=0.05)
    with clock.phase("driver:evolution") as earlier:
        assert earlier == 0.0
        time.sleep(0.2)
        saved = json.loads((tmp_path / "clock.json").read_text())  # written while running (a SIGKILL keeps it)
        assert saved["driver:evolution"] > 0.05
    clock.close()
    first = clock.spent("driver:evolution")
    assert first >= 0.2

    resumed = RunClock(tmp_path)
    assert resumed.spent("driver:evolution") == pytest.approx(first)
    with resumed.phase("driver:evolution") as earlier:
        assert earlier == pytest.approx(first)
        time.sleep(0.1)
    resumed.close()
    assert resumed.spent("driver:evolution") >= first + 0.1
    with resumed.phase("setup", extra=5.0):
        pass
    assert resumed.spent("setup") >= 5.0 and resumed.spent() >= first + 5.1


def test_a_resumed_driver_budget_counts_the_time_it_used_before(tmp_path):
    config = SearchConfig(out=tmp_path, budget_minutes=1.0)
    budget = _budget(config, 60.0, 1.0, 1.0, (0, 0, 0.0), 128, already=45.0)
    assert budget.max_seconds == pytest.approx(60.0) and 45.0 <= budget.elapsed < 46.0
    assert not budget.exhausted()
    assert _budget(config, 60.0, 1.0, 1.0, (0, 0, 0.0), 128, already=61.0).exhausted()
    grown = _budget(SearchConfig(out=tmp_path, budget_evals=30), None, 1.0, 1.0, (0, 0, 0.0), 128, already=0.0)
    assert grown.max_evals == 30 and grown.max_seconds is None


def test_the_deadline_gives_the_search_what_setup_and_final_passes_leave(tmp_path):
    clock = RunClock(tmp_path)
    with clock.phase("setup", extra=20.0):
        pass
    deadline = SearchConfig(out=tmp_path, deadline_minutes=2.0)
    assert _search_seconds(deadline, clock, 30.0) == pytest.approx(120 - 20 - 30, abs=0.5)
    both = SearchConfig(out=tmp_path, deadline_minutes=2.0, budget_minutes=0.5)
    assert _search_seconds(both, clock, 30.0) == pytest.approx(30.0)
    with pytest.raises(SparseAllocError, match="leaves no time to search"):
        _search_seconds(SearchConfig(out=tmp_path, deadline_minutes=0.5), clock, 30.0)
    assert _search_seconds(SearchConfig(out=tmp_path, budget_evals=3), clock, 30.0) is None
