"""The tune-* drivers as Ray Tune experiments whose trials are scored by the one evaluator pool: a local Ray
(num_cpus=3, two CPU actors) with a planted problem (block 0 is fragile), fidelity rungs of 32, 64 and 128
fitness tokens (one, two and four windows)."""

import asyncio
import json
import threading

import pytest
import ray
from ray import tune

from conftest import fragile_pool
from orchestrator.runtime.candidates import Candidate
from orchestrator.runtime.mailbox import Mailbox, rung_trial, serve
from orchestrator.runtime.results import ResultsTable
from orchestrator.search.budget import Budget, Charged
from orchestrator.search.drivers import tune as tune_driver
from orchestrator.search.drivers.tune import fidelity_rungs, make_sampler, make_scheduler, run_tune
from orchestrator.search.progress import DriverProgress
from search_spaces import families

TARGET = 0.6
RUNGS = [32, 64, 128]
HANG_GUARD_S = 600  # a wait that only a hang outlasts
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


@ray.remote(num_cpus=0)
class _Gate:
    """Holds whoever waits on it until it is opened."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()

    async def open(self) -> None:
        self.event.set()


@ray.remote(num_cpus=0)
def _held(gate, refs: list):
    """The answer of ``refs[0]``, handed over only once ``gate`` opens (a long evaluation, as the pool sees it)."""
    ray.get(gate.wait.remote())
    return ray.get(refs[0])


def test_a_short_rung_is_answered_while_a_long_one_is_still_being_scored(pool, tmp_path):
    """Two trials ask at once, one for 128 tokens (held by a gate: a long evaluation) and one for 32: the
    short one goes to the other actor and its answer is posted while the long one is still out."""
    gate = _Gate.remote()
    original_results, original_actors = pool.results, list(pool.actors)

    class Holding:  # an actor handle whose 128-token calls end only once the gate opens
        def __init__(self, actor):
            class Evaluate:
                @staticmethod
                def remote(batch):
                    ref = actor.evaluate.remote(batch)
                    return _held.remote(gate, [ref]) if any(c.tokens == 128 for c in batch) else ref

            self.evaluate = Evaluate

    table = pool.results = ResultsTable(tmp_path / "run", "tune")
    pool.actors = [Holding(actor) for actor in original_actors]
    budget = Budget()
    answers = tune_driver._Answers(Charged(pool, budget, 128), "tune-atp", ATP[1], 128,
                                   DriverProgress("tune-atp", budget, False))
    mailbox, stop = Mailbox.remote(), threading.Event()
    server = threading.Thread(target=serve, args=(mailbox, answers, lambda: not stop.is_set()), daemon=True)
    server.start()
    try:
        long_question = {"config": {"beta": 0.01}, "skip": 0, "tokens": 128, "rung": 1, "trial": "long"}
        short_question = {"config": {"beta": 0.02}, "skip": 0, "tokens": 32, "rung": 1, "trial": "short"}
        long_answer, short_answer = mailbox.ask.remote(long_question), mailbox.ask.remote(short_question)
        short = ray.get(short_answer, timeout=HANG_GUARD_S)  # with the gate still shut
        assert ray.wait([long_answer], timeout=0)[0] == [] and set(answers.trials) == {"short"}
        ray.get(gate.open.remote())
        long = ray.get(long_answer, timeout=HANG_GUARD_S)
    finally:
        stop.set()
        server.join(timeout=HANG_GUARD_S)
        pool.results, pool.actors = original_results, original_actors
    assert {row["tokens"]: row["fitness"] for row in table.read()} == {32: short, 128: long}
    assert (budget.used_evals, budget.used_tokens) == (2, 160)
    assert answers.trials["short"]["kl"] == short and answers.trials["long"]["kl"] == long and long != short
