"""The tune-* drivers as Ray Tune experiments whose trials are scored by the one evaluator pool: a local Ray
(num_cpus=3, two CPU actors) with a planted problem (block 0 is fragile), fidelity rungs of 32, 64 and 128
fitness tokens (one, two and four windows)."""

import json

import pytest
from ray import tune

from conftest import fragile_pool
from orchestrator.runtime.candidates import Candidate
from orchestrator.runtime.mailbox import rung_trial
from orchestrator.runtime.results import ResultsTable
from orchestrator.search.budget import Budget, Charged
from orchestrator.search.drivers import tune as tune_driver
from orchestrator.search.drivers.tune import fidelity_rungs, make_sampler, make_scheduler, run_tune
from search_spaces import families

TARGET = 0.6
RUNGS = [32, 64, 128]
ATP = families.atp_space(4, TARGET), (lambda c: families.atp(4, TARGET, c["beta"]))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    yield from fragile_pool(tmp_path_factory)


@pytest.fixture
def counted(pool, tmp_path):
    """The pool with a fresh results table, its actors wrapped to record every key they are sent."""
    sent: list[str] = []
    original_results, original_actors = pool.results, list(pool.actors)

    class Counting:  # an actor handle whose evaluate.remote records what it is asked to score
        def __init__(self, actor):
            class Evaluate:
                @staticmethod
                def remote(batch):
                    sent.extend(c.key for c in batch)
                    return actor.evaluate.remote(batch)

            self.evaluate = Evaluate

    pool.results = ResultsTable(tmp_path / "run", "tune")
    pool.actors = [Counting(actor) for actor in original_actors]
    yield pool, sent
    pool.results, pool.actors = original_results, original_actors


def _tune(pool, tmp_path, budget, space_build=ATP, **kwargs):
    space, build = space_build
    return run_tune(Charged(pool, budget, 128), "tune-atp", space, build, RUNGS, seed=0,
                    experiment=tmp_path / "tune" / "tune-atp", progress=False, **kwargs)


def test_every_rung_of_every_trial_is_one_pool_evaluation_recorded_with_its_trial(counted, tmp_path):
    pool, sent = counted
    budget = Budget(max_tokens=12 * 128)
    result = _tune(pool, tmp_path, budget)
    rows = pool.results.read()
    assert rows and all(row["driver"] == "tune-atp" for row in rows)
    assert sorted(sent) == sorted(row["key"] for row in rows) and len(sent) == len(set(sent))  # once each
    params = [json.loads(row["params"]) for row in rows]
    rungs = [(p["trial"], p["rung"], p["skip"], row["tokens"]) for p, row in zip(params, rows)]
    for trial, rung, skip, tokens in rungs:  # each rung scores only the tokens it adds
        assert [skip, skip + tokens] == ([0] + RUNGS)[rung - 1:rung + 1]
        assert all((trial, r) in {(t, g) for t, g, _, _ in rungs} for r in range(1, rung))  # climbed in order
    assert budget.used_tokens == sum(tokens for *_, tokens in rungs) <= 12 * 128  # every rung charged
    assert result.details["trials"] == len({trial for trial, *_ in rungs})
    assert result.fitness < pool.evaluate([Candidate.of(families.uniform(4, TARGET), 128)])[0]


def test_concurrent_trials_asking_for_one_profile_cause_one_evaluation_per_rung(counted, tmp_path):
    pool, sent = counted
    budget = Budget(max_evals=24)
    same = (families.atp_space(4, TARGET), lambda c: families.uniform(4, TARGET))  # every β gives uniform
    result = _tune(pool, tmp_path, budget, same, scheduler="fifo", trials=8)
    assert result.details["trials"] == 8 and budget.used_evals == 24  # 8 trials x 3 rungs asked and charged
    assert len(sent) == 3  # one evaluation per rung


def test_asha_stops_trials_at_a_rung_and_fifo_runs_every_trial_to_the_top(counted, tmp_path):
    pool, _ = counted
    fifo = _tune(pool, tmp_path / "fifo", Budget(max_evals=200), scheduler="fifo", trials=8, max_concurrent=2)
    assert fifo.details["trials_per_last_rung"] == {1: 0, 2: 0, 3: 8}
    asha = _tune(pool, tmp_path / "asha", Budget(max_evals=200), scheduler="asha", trials=8, max_concurrent=2)
    last = asha.details["trials_per_last_rung"]
    assert sum(last.values()) == 8 and last[1] + last[2] > 0 and last[3] >= 1  # some stopped below the top


def test_the_experiment_directory_is_a_tune_experiment_tune_can_read(counted, tmp_path):
    pool, _ = counted
    result = _tune(pool, tmp_path, Budget(max_evals=100), trials=3, scheduler="fifo")  # ends by num_samples
    path = tmp_path / "tune" / "tune-atp"
    assert result.details["experiment"] == str(path) and tune.Tuner.can_restore(str(path))
    grid = tune.Tuner.restore(str(path), rung_trial).get_results()  # Tune reads it back
    assert len(grid) == 3 and {r.metrics["rung"] for r in grid} == {3}
    assert min(r.metrics["kl"] for r in grid) == pytest.approx(result.fitness)
    assert list(path.glob("*/events.out.tfevents.*"))  # tensorboard --logdir RUN/tune


def test_names_and_rungs():
    assert fidelity_rungs((256, 1024, 4096), 4096, 128) == [256, 1024, 4096]
    assert fidelity_rungs((100, 1024, 4096), 512, 128) == [128, 512]  # rounded to windows, capped at all tokens
    assert type(make_scheduler("asha", RUNGS)).__name__ == "AsyncHyperBandScheduler"
    with pytest.raises(Exception, match="unknown Tune scheduler"):
        make_scheduler("pbt", RUNGS)
    with pytest.raises(Exception, match="unknown Optuna sampler"):
        make_sampler("grid", 0)


def test_a_finished_experiment_is_reused_with_its_spend_and_an_interrupted_one_replayed(counted, tmp_path,
                                                                                        monkeypatch):
    pool, sent = counted
    first_budget = Budget(max_evals=12)
    first = _tune(pool, tmp_path, first_budget, scheduler="asha", max_concurrent=1)
    asked = len(sent)
    record = tmp_path / "tune" / "tune-atp" / tune_driver.RESULT_FILE
    assert record.exists()

    def no_tuner(*args, **kwargs):
        raise AssertionError("a finished experiment ran again")

    with monkeypatch.context() as patch:
        patch.setattr(tune_driver.tune, "Tuner", no_tuner)
        again_budget = Budget(max_evals=12)
        again = _tune(pool, tmp_path, again_budget, scheduler="asha", max_concurrent=1)
    assert again.best == first.best and again.fitness == first.fitness and len(sent) == asked
    assert (again_budget.used_evals, again_budget.used_tokens) == (first_budget.used_evals, first_budget.used_tokens)

    # Without the record (an interrupted experiment), one trial at a time replays it from its seed: the table
    # answers every rung, the experiment ends as before.
    record.unlink()
    replay_budget = Budget(max_evals=12)
    replay = _tune(pool, tmp_path, replay_budget, scheduler="asha", max_concurrent=1)
    assert replay.best == first.best and replay.fitness == first.fitness and len(sent) == asked
    assert replay_budget.used_tokens == first_budget.used_tokens and record.exists()


def test_the_report_figure_counts_each_trial_at_the_rung_it_reached(counted, tmp_path):
    from orchestrator.report.sections import trials_plot, tune_trials

    pool, _ = counted
    result = _tune(pool, tmp_path, Budget(max_evals=200), scheduler="asha", trials=8, max_concurrent=2)
    trials = tune_trials(pool.results.read())["tune-atp"]
    reached = {rung: sum(1 for t in trials.values() if t["rung"] == rung) for rung in (1, 2, 3)}
    assert reached == result.details["trials_per_last_rung"]
    best = min(t["sum"] / t["tokens"] for t in trials.values() if t["rung"] == 3)
    assert best == pytest.approx(result.fitness)  # the running KL over all the tokens of the top rung
    assert all("beta" in t["config"] for t in trials.values())
    assert trials_plot(pool.results.read(), 3).png.startswith(b"\x89PNG")
