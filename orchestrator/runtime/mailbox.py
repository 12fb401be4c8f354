"""The evaluator pool as a service any Ray worker can call: Tune trials ask the mailbox for a fitness, the
search process takes the questions, evaluates them through its one :class:`EvaluatorPool` (dispatch,
exactly-once answers, results-table writes) and posts the answers back.

The mailbox is an async actor with no resources of its own: a question waits there (an ``await``, no
thread) until its answer is posted. Questions are opaque to it; :func:`serve` in the search process
turns them into candidates. Two trials asking for the same profile at the same time are one evaluation:
the pool's dispatch scores a key once, and a later question finds the key in the results table.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Callable

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class Mailbox:
    """Questions from trials, answers from the search process."""

    def __init__(self) -> None:
        self._questions: list[tuple[int, Any]] = []
        self._answers: dict[int, asyncio.Future] = {}
        self._arrived = asyncio.Event()
        self._next = 0
        self._closed = False

    async def ask(self, question: Any) -> Any:
        """Wait for the answer to ``question`` (None once the mailbox is closed: the budget is spent or the
        search is ending)."""
        if self._closed:
            return None
        number, self._next = self._next, self._next + 1
        future = asyncio.get_running_loop().create_future()
        self._answers[number] = future
        self._questions.append((number, question))
        self._arrived.set()
        return await future

    async def take(self, timeout: float) -> list[tuple[int, Any]]:
        """Every question not yet taken, waiting up to ``timeout`` seconds for the first."""
        if not self._questions:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        taken, self._questions = self._questions, []
        return taken

    def answer(self, answers: dict[int, Any]) -> None:
        for number, value in answers.items():
            future = self._answers.pop(number, None)
            if future is not None and not future.done():
                future.set_result(value)

    def close(self) -> None:
        """Answer every open question with None, and every later one at once."""
        self._closed = True
        self.answer({number: None for number in list(self._answers)})
        self._questions = []


def serve(mailbox, answers, running: Callable[[], bool], poll_s: float = 0.2) -> int:
    """Take the mailbox's questions as trials ask them and post each answer as soon as it is known, while
    ``running()``; returns how many questions were answered. Runs in the search process (the pool's).

    ``answers`` scores the questions: ``ask(numbered)`` takes ``(number, question)`` pairs in, ``busy`` says
    whether some are being scored, ``step(wake)`` waits until one score is in or a ref of ``wake`` is ready (the
    mailbox's next questions), and ``ready()`` hands over the answers known so far by question number. So a
    question that arrives while others are scored goes to an actor at once, and a short one is answered
    without waiting for a long one."""
    answered = 0
    take = mailbox.take.remote(poll_s)
    while running():
        if answers.busy:
            answers.step([take])
        else:
            ray.wait([take], timeout=poll_s)
        if ray.wait([take], timeout=0)[0]:
            taken, take = ray.get(take), mailbox.take.remote(poll_s)
            if taken:
                answers.ask(taken)
        ready = answers.ready()
        if ready:
            ray.get(mailbox.answer.remote(ready))
            answered += len(ready)
    return answered


def rung_trial(config: dict, mailbox, rungs: list[int]) -> None:
    """One Tune trial: climbs the rungs, reporting the running KL over the tokens scored so far. Ends
    early when a rung's question is answered with None (the budget is spent). It lives here, beside the
    mailbox, so that a trial's worker process imports Ray and nothing heavier (no torch)."""
    from ray import tune

    trial = tune.get_context().get_trial_id()
    kl_sum, skip = 0.0, 0
    for rung, top in enumerate(rungs, start=1):
        question = {"config": config, "skip": skip, "tokens": top - skip, "rung": rung, "trial": trial}
        value = ray.get(mailbox.ask.remote(question))
        if value is None:
            return
        kl_sum += (value if math.isfinite(value) else 1e9) * (top - skip)
        tune.report({"kl": kl_sum / top, "tokens": top, "tokens_before": skip, "rung": rung})
        skip = top
