"""The evaluator pool as a service any Ray worker can call: Tune trials ask the mailbox for a fitness, the
search process takes the questions, evaluates them through its one :class:`EvaluatorPool` (dispatch,
exactly-once answers, results-table writes) and posts the answers back.

The mailbox is an async actor with no resources of its own: a question waits there (an ``await``, no
thread) until its answer is posted. Questions are opaque to it; :func:`serve` in the search process
turns them into candidates. Two trials asking for the same profile at the same time are one evaluation:
the pool evaluates a batch's distinct keys once, and a later batch finds the key in the results table.
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


def serve(mailbox, respond: Callable[[list[Any]], list[Any]], running: Callable[[], bool],
          poll_s: float = 0.2) -> int:
    """Take the mailbox's questions in batches and post ``respond(questions)``'s answers while
    ``running()``; returns how many questions were answered. Runs in the search process (the pool's)."""
    answered = 0
    while running():
        taken = ray.get(mailbox.take.remote(poll_s))
        if not taken:
            continue
        values = respond([question for _, question in taken])
        ray.get(mailbox.answer.remote({number: value for (number, _), value in zip(taken, values)}))
        answered += len(taken)
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
