"""Phase clocks kept in the run directory, and driver budgets that continue across a resume."""

import json
import time

import pytest

from orchestrator.runtime.clock import RunClock
from conftest import settings_of
from orchestrator.search.budget import driver_budget, search_seconds
from orchestrator.search.config import SearchConfig
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
    budget = driver_budget(settings_of(config), 60.0, 1.0, 1.0, (0, 0, 0.0), already=45.0)
    assert budget.max_seconds == pytest.approx(60.0) and 45.0 <= budget.elapsed < 46.0
    assert not budget.exhausted()
    assert driver_budget(settings_of(config), 60.0, 1.0, 1.0, (0, 0, 0.0), already=61.0).exhausted()
    grown = driver_budget(settings_of(SearchConfig(out=tmp_path, budget_evals=30)), None, 1.0, 1.0, (0, 0, 0.0), already=0.0)
    assert grown.max_evals == 30 and grown.max_seconds is None


def test_the_deadline_gives_the_search_what_setup_and_final_passes_leave(tmp_path):
    clock = RunClock(tmp_path)
    with clock.phase("setup", extra=20.0):
        pass
    deadline = SearchConfig(out=tmp_path, deadline_minutes=2.0)
    setup = clock.spent("setup")
    assert search_seconds(settings_of(deadline), setup, 30.0) == pytest.approx(120 - 20 - 30, abs=0.5)
    both = SearchConfig(out=tmp_path, deadline_minutes=2.0, budget_minutes=0.5)
    assert search_seconds(settings_of(both), setup, 30.0) == pytest.approx(30.0)
    with pytest.raises(SparseAllocError, match="leaves no time to search"):
        search_seconds(settings_of(SearchConfig(out=tmp_path, deadline_minutes=0.5)), setup, 30.0)
    assert search_seconds(settings_of(SearchConfig(out=tmp_path, budget_evals=3)), setup, 30.0) is None
