"""Pool faults on a local Ray (num_cpus=3, two CPU actors on the tiny model): an actor gone for good
is replaced and its candidates re-submitted, an evaluator error is one clear SparseAllocError, actors
that cannot be placed fail within the placement timeout, and a transient ActorUnavailableError is
retried without burying the actor."""

import logging
import time

import pytest
import ray
import torch

from conftest import build_model, save_model_dir, tiny_llama_config
from orchestrator.runtime import pool as pool_module
from orchestrator.runtime.candidates import Candidate
from orchestrator.runtime.cluster import start_local
from orchestrator.runtime.pool import EvaluatorPool, EvaluatorSpec
from orchestrator.runtime.results import ResultsTable
from core.errors import SparseAllocError
from search_spaces import families


def _tokens():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 120, (4, 32), generator=generator), torch.randint(3, 120, (4, 32), generator=generator)


def _atp(target: float, count: int, driver: str) -> list[Candidate]:
    top = families.atp_beta_max(4, target)
    return [Candidate.of(families.atp(4, target, i * top / (count - 1)), driver=driver) for i in range(count)]


@pytest.fixture(scope="module")
def local_ray():
    start_local(num_cpus=3)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(build_model(tiny_llama_config()), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pool(local_ray, model_dir, tmp_path_factory):
    pool = EvaluatorPool(EvaluatorSpec(str(model_dir), owl_multipliers=(5.0,)), *_tokens(),
                         ResultsTable(tmp_path_factory.mktemp("run"), "t"), num_actors=2)
    yield pool
    pool.close()


@pytest.fixture
def results(pool, tmp_path):
    """A fresh results table per test, so every test evaluates its candidates itself."""
    original = pool.results
    pool.results = ResultsTable(tmp_path / "run", "fault")
    yield pool.results
    pool.results = original


def test_actor_gone_for_good_is_replaced_and_its_candidates_resubmitted(pool, results, monkeypatch):
    candidates = _atp(0.5, 16, "kill")
    victim, victim_name = pool.actors[0], pool.infos[0]["actor"]
    replacements, resubmitted = pool.replacements, pool.resubmitted
    wait, killed = ray.wait, []

    def kill_then_wait(*args, **kwargs):  # the first wait comes right after both actors got their batches
        if not killed:
            killed.append(victim)
            ray.kill(victim, no_restart=True)  # no restart left: Ray's own retry cannot hide the loss
        return wait(*args, **kwargs)

    monkeypatch.setattr(pool_module.ray, "wait", kill_then_wait)
    fitness = pool.evaluate(candidates)
    monkeypatch.undo()

    assert killed and len(fitness) == 16 and all(f >= 0 for f in fitness)
    assert pool.resubmitted > resubmitted  # the killed actor's in-flight candidates were sent again
    assert pool.replacements == replacements + 1 and len(pool.actors) == 2
    assert pool.actors[0] is not victim and 0 not in pool.dead
    pool.wait_for_replacements()
    assert pool.infos[0]["actor"] != victim_name and pool.infos[0]["blocks"] == 4
    assert ray.get(pool.actors[0].info.remote())["actor"] == pool.infos[0]["actor"]  # the replacement serves
    keys = sorted(row["key"] for row in results.read())
    assert keys == sorted(c.key for c in candidates)  # every candidate's row, each exactly once
    assert victim_name not in {row["actor"] for row in results.read()}


def test_evaluator_error_is_one_clear_error_and_keeps_results(pool, results):
    good = _atp(0.55, 4, "good")
    pool.evaluate(good[:2])
    bad = Candidate.of(families.uniform(4, 0.5), driver="bad", metric="no-such-metric")  # raises inside the actor
    with pytest.raises(SparseAllocError) as caught:
        pool.evaluate(good[2:] + [bad])  # two batches: [good, good] on one actor, [bad] on the other
    message = str(caught.value)
    assert "SparseAllocError: unknown fitness metric 'no-such-metric'" in message
    assert any(info["actor"] in message and info["node"] in message for info in pool.infos)
    assert "Traceback" not in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # reported once, not chained
    assert all(results.get(c.key) is not None for c in good)  # earlier rows kept, the other batch drained
    assert results.get(bad.key) is None and len(results.read()) == 4
    assert not pool.dead and pool.evaluate([good[0]]) == [results.get(good[0].key)["fitness"]]  # still serving


def test_unplaceable_actors_fail_within_the_timeout_naming_what_is_missing(local_ray, model_dir, tmp_path):
    start = time.monotonic()
    with pytest.raises(SparseAllocError) as caught:
        EvaluatorPool(EvaluatorSpec(str(model_dir)), *_tokens(), ResultsTable(tmp_path, "gpu"), num_actors=2,
                      gpu=True, placement_timeout_s=2)
    assert time.monotonic() - start < 15  # the 2 s timeout, a poll and the start of two actor processes
    message = str(caught.value)
    assert "2 of 2 evaluator actors could not be placed within 2 s" in message
    assert "each needs GPU: 1, CPU: 1" in message and "the cluster has GPU: 0" in message
    assert "no node has GPU: 1" in message and "--gpu-actors" in message
    from ray._private import state

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the pending actors were killed, not left waiting for a GPU
        pending = [a for a in state.actors().values() if a["State"] == "PENDING_CREATION"]
        if not pending:
            break
        time.sleep(0.2)
    assert not pending


def test_every_actor_gone_and_no_replacement_left_is_a_clear_error(local_ray, model_dir, tmp_path):
    lone = EvaluatorPool(EvaluatorSpec(str(model_dir)), *_tokens(), ResultsTable(tmp_path, "lone"), num_actors=1,
                         max_replacements=0)
    try:
        ray.kill(lone.actors[0], no_restart=True)
        with pytest.raises(SparseAllocError) as caught:
            lone.evaluate(_atp(0.5, 3, "lone"))
        message = str(caught.value)
        assert "every evaluator actor is gone and the 0 replacement(s) are used up" in message
        assert "killed by `ray.kill`" in message and "--resume" in message
    finally:
        lone.close()


def test_unavailable_actor_is_retried_not_buried(pool, results, monkeypatch, caplog):
    pool.wait_for_replacements()
    candidate = _atp(0.45, 2, "blip")[1]
    actors, replacements = list(pool.actors), pool.replacements
    get, calls = ray.get, []

    def flaky_get(refs, *args, **kwargs):
        calls.append(refs)
        if len(calls) == 1:
            raise ray.exceptions.ActorUnavailableError("the connection dropped for a moment", None)
        return get(refs, *args, **kwargs)

    monkeypatch.setattr(pool, "retry_backoff_s", 0.05)
    monkeypatch.setattr(pool_module.ray, "get", flaky_get)
    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.pool"):
        fitness = pool.evaluate([candidate])
    monkeypatch.undo()

    assert len(calls) == 2  # the batch was sent again after the blip, and answered
    assert "unavailable" in caplog.text and "re-submitting" in caplog.text
    assert not pool.dead and pool.replacements == replacements  # not taken for dead
    assert all(now is before for now, before in zip(pool.actors, actors))
    assert results.get(candidate.key)["fitness"] == fitness[0] and len(results.read()) == 1


def _freeze(pool, monkeypatch, failing: int, backoff_s: float) -> list:
    """The pool's actors answer the first ``failing`` ``ray.get``s with ActorUnavailableError, as a frozen
    actor does; the pool replaces an actor after that many in a row (a replacement is allowed). The list of
    ``ray.get`` calls made, for the test to count."""
    get, calls = ray.get, []

    def frozen_get(refs, *args, **kwargs):
        calls.append(refs)
        if len(calls) <= failing:
            raise ray.exceptions.ActorUnavailableError("keepalive watchdog timeout", None)
        return get(refs, *args, **kwargs)

    monkeypatch.setattr(pool, "retry_backoff_s", backoff_s)
    monkeypatch.setattr(pool, "unavailable_retries", failing - 1)
    monkeypatch.setattr(pool, "max_replacements", pool.replacements + 1)  # earlier tests may have used them up
    monkeypatch.setattr(pool_module.ray, "get", frozen_get)
    return calls


def test_a_single_call_to_an_actor_unavailable_too_many_times_in_a_row_goes_to_its_replacement(pool, monkeypatch,
                                                                                              caplog):
    """Fisher traces and OWL ratios are single calls: a frozen actor used to be asked again forever."""
    pool.wait_for_replacements()
    replacements = pool.replacements
    _freeze(pool, monkeypatch, failing=3, backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.pool"):
        ratios = pool.call("outlier_ratios", 5.0)
    monkeypatch.undo()

    assert len(ratios) == 4 and pool.replacements == replacements + 1
    assert "asking again (1 time(s) in a row" in caplog.text and "unavailable 3 times in a row" in caplog.text
    assert pool.unavailable == [0] * len(pool.actors)  # an answer resets the count


def test_single_calls_survive_a_dead_actor_and_report_errors(pool):
    ray.kill(pool.actors[0], no_restart=True)
    assert len(pool.call("outlier_ratios", 5.0)) == 4  # answered by a live or replacement actor
    with pytest.raises(SparseAllocError, match=r"failed computing outlier_ratios: SparseAllocError: OWL ratios"):
        pool.call("outlier_ratios", 7.0)


def test_actor_unavailable_too_many_times_in_a_row_is_replaced_and_the_batch_answered(pool, results, monkeypatch, caplog):
    """A frozen actor (a stopped process, a stalled host) answers every retry with ActorUnavailableError:
    after the retries it is taken for gone and replaced, and the search goes on instead of ending."""
    pool.wait_for_replacements()
    candidate = _atp(0.4, 2, "frozen")[1]
    replacements, resubmitted, dead = pool.replacements, pool.resubmitted, set(pool.dead)
    failing = 3  # the first send and both retries
    calls = _freeze(pool, monkeypatch, failing, backoff_s=0.05)
    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.pool"):
        fitness = pool.evaluate([candidate])
    monkeypatch.undo()

    assert len(calls) > failing  # answered once the actor was replaced (the replacement's start is read too)
    assert pool.replacements == replacements + 1 and pool.resubmitted == resubmitted + 1
    assert "unavailable 3 times in a row" in caplog.text and "starting a replacement" in caplog.text
    assert results.get(candidate.key)["fitness"] == fitness[0] and len(results.read()) == 1
    pool.wait_for_replacements()
    assert pool.dead == dead  # the replaced slot serves again (earlier tests may have left one dead)
    assert all(ray.get(pool.actors[i].info.remote())["blocks"] == 4 for i in range(2) if i not in dead)
