"""Drivers on a local Ray (num_cpus=3, two CPU actors) with a planted problem: block 0 is fragile."""

import time

import pytest
import ray

from conftest import fragile_pool
from orchestrator.search.budget import Budget, Charged
from orchestrator.runtime.candidates import Candidate
from orchestrator.search.drivers.evolution import EvolutionConfig, run_evolution
from orchestrator.runtime.results import ResultsTable
from orchestrator.search.drivers.shapley import run_shapley
from search_spaces import families

TARGET = 0.6


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    yield from fragile_pool(tmp_path_factory)


@pytest.fixture
def uniform_fitness(pool):
    return pool.evaluate([Candidate.of(families.uniform(4, TARGET))])[0]


def test_shapley_driver_beats_uniform_within_budget(pool, uniform_fitness):
    budget = Budget(max_evals=20)
    result = run_shapley(Charged(pool, budget), TARGET, window=2, progress=False)
    assert result.fitness < 0.5 * uniform_fitness
    assert result.best.sparsities[0] == min(result.best.sparsities)
    assert budget.used_evals <= 20
    assert result.best.mean() == pytest.approx(TARGET)


def test_evolution_driver_beats_uniform_within_budget(pool, uniform_fitness):
    budget = Budget(max_evals=30)
    result = run_evolution(Charged(pool.evaluate, budget), [families.uniform(4, TARGET)],
                           EvolutionConfig(target=TARGET, offspring=8, survivors=(3, 1), fidelities=(64, 128)))
    assert budget.used_evals <= 30
    assert result.fitness < uniform_fitness
    assert result.best.sparsities[0] < TARGET


def test_time_budget_stops_cleanly(pool):
    budget = Budget(max_seconds=0.01)
    time.sleep(0.02)
    result = run_shapley(Charged(pool, budget), 0.55, window=2, progress=False)
    assert result.evaluations == 0 and "budget" in result.details["note"]


def test_killed_actor_is_replaced_and_no_result_is_lost(pool, monkeypatch):
    candidates = [Candidate.of(families.atp(4, 0.5, beta), driver="kill-test") for beta in
                  [i * families.atp_beta_max(4, 0.5) / 11 for i in range(12)]]
    victim, replacements, resubmitted = pool.actors[0], pool.replacements, pool.resubmitted
    wait, killed = ray.wait, []

    def kill_then_wait(*args, **kwargs):  # the pool's first wait: both actors hold batches in flight
        if not killed:
            killed.append(victim)
            ray.kill(victim, no_restart=True)  # no restart left, so Ray's own retry cannot hide the loss
        return wait(*args, **kwargs)

    monkeypatch.setattr(ray, "wait", kill_then_wait)
    fitness = pool.evaluate(candidates)
    monkeypatch.undo()
    assert killed and len(fitness) == 12 and all(f >= 0 for f in fitness)
    assert all(pool.results.get(c.key) is not None for c in candidates)
    assert pool.resubmitted > resubmitted  # the pool re-submitted the dead actor's in-flight candidates
    assert pool.replacements == replacements + 1 and pool.actors[0] is not victim
    pool.wait_for_replacements()
    assert ray.get(pool.actors[0].info.remote())["blocks"] == 4  # the replacement is serving


def test_interrupt_then_resume_repeats_no_finished_evaluation(pool, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = pool.results
    try:
        pool.results = ResultsTable(run_dir, "first")
        monkeypatch.setattr(pool.results, "append_many", _interrupted_after(pool.results.append_many, 5))
        with pytest.raises(KeyboardInterrupt):
            run_shapley(Charged(pool, Budget(max_evals=100)), 0.45, window=2, chunk=4, progress=False)
        check = ResultsTable(run_dir, "check")
        assert len(check.read()) == 5 and check.duplicate_keys() == []  # rows, not distinct keys

        pool.results = ResultsTable(run_dir, "resumed")
        new_rows = []
        append_resumed = pool.results.append_many
        monkeypatch.setattr(pool.results, "append_many", lambda rows: new_rows.extend(rows) or append_resumed(rows))
        result = run_shapley(Charged(pool, Budget(max_evals=100)), 0.45, window=2, chunk=4, progress=False)
        check = ResultsTable(run_dir, "check")
        total = len(check.read())  # rows: a re-evaluated candidate would add one
        assert check.duplicate_keys() == []
        assert len(new_rows) == total - 5  # the five finished evaluations were not redone
        assert result.evaluations == total
    finally:
        pool.results = original


def test_draws_are_separate_evaluations_scored_on_their_own_windows(pool):
    profile = families.atp(4, 0.5, families.atp_beta_max(4, 0.5) / 2)
    first, fresh = Candidate.of(profile, 32, "draw-test"), Candidate.of(profile, 32, "draw-test", draw=1)
    assert first.key != fresh.key
    fitness = pool.evaluate([first, fresh])
    assert fitness[0] != fitness[1]
    assert [pool.results.get(c.key)["draw"] for c in (first, fresh)] == [0, 1]


def _interrupted_after(append_many, rows: int):
    """``append_many`` that writes the first ``rows`` rows, then raises KeyboardInterrupt (an interrupt
    arriving while results come in)."""
    written = {"n": 0}

    def interrupted(batch):
        room = rows - written["n"]
        if len(batch) > room:
            append_many(batch[:room])
            written["n"] = rows
            raise KeyboardInterrupt
        written["n"] += len(batch)
        return append_many(batch)

    return interrupted
