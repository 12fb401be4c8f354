"""Ray Tune over a family's hyper-parameters (ATP β, OWL λ/M, map strength, free vectors): a
``ray.tune.Tuner`` experiment whose trials are scored by the search's one evaluator pool.

- **Search algorithm**: ``OptunaSearch`` (TPE, multivariate; or CMA-ES for free vectors) under a
  ``ConcurrencyLimiter`` of two trials per evaluator actor.
- **Trials and rungs**: a trial is one hyper-parameter setting. Its iterations are fidelity rungs: it
  reports the running KL over its first ``rungs[0]`` fitness tokens, then ``rungs[1]`` … up to all of
  them, each rung scoring only the tokens it adds (a candidate with ``skip``), with ``tokens`` as Tune's
  ``time_attr``.
- **Scheduler**: ``asha`` (``ASHAScheduler``: a trial whose running KL is not in the best
  1/reduction-factor of its rung stops there), ``hyperband`` (asynchronous HyperBand, three brackets)
  or ``fifo`` (every trial runs every rung: plain Optuna).
- **Through the pool**: a trial asks the :class:`~orchestrator.runtime.mailbox.Mailbox` for each rung's
  fitness; this process takes the questions as they come, charges them to the driver's budget and sends
  them to the pool's dispatch (one call per actor at a time, results table, exactly one evaluation per
  key), answering each as soon as its score is in: the actor that finishes a short rung takes the next
  question rather than wait for the other's long one. Trials are light: no CPU, no GPU, a MiB of memory;
  the actors keep the devices.
- **Budgets**: every rung is charged its tokens; a question the budget cannot pay is answered with
  None, which ends the trial and, through a stopper, the experiment. ``--budget-minutes`` is the
  experiment's ``time_budget_s`` too, ``--budget-evals`` its ``num_samples``.
- **Experiment directory** ``RUN/tune/<driver>`` (``storage_path``): Tune's state, its loggers'
  files (``tensorboard --logdir RUN/tune``), readable with ``tune.ResultGrid`` / ``Tuner.restore``, and
  ``sparsealloc-result.json`` once the experiment finished. Trials save no checkpoints: the results table
  is the state, so the experiment needs no storage shared by the nodes.
- **Resume**: a finished experiment is not run again (its result and spend are read back). An interrupted
  one is run again from its seed, not with ``Tuner.restore``: Tune saves no scheduler state and its
  searcher's state only every checkpoint period, so a restored experiment does not continue as the
  interrupted one would have. Run again, every rung it scored is answered by the results table (charged,
  not evaluated); with one trial at a time (``--tune-concurrency 1``) the replay is exact and the
  experiment ends as an uninterrupted one. With more, trials finish in the order the actors answer, so the
  replay may ask for other profiles after the first ones; none is evaluated twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import optuna
import ray
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from ray import tune
from ray.tune.schedulers import ASHAScheduler, AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from core.errors import SparseAllocError
from core.identity import write_json
from core.profile import Profile
from orchestrator.runtime.candidates import Candidate, DriverResult
from orchestrator.runtime.mailbox import Mailbox, rung_trial, serve
from orchestrator.search.budget import Charged
from orchestrator.search.config import SAMPLERS, SCHEDULERS
from orchestrator.search.progress import DriverProgress
from search_spaces import families
from search_spaces.families import Space

if TYPE_CHECKING:
    from orchestrator.search.drivers.context import DriverContext

log = logging.getLogger(__name__)
DEFAULT_TRIALS = 20  # with no evaluation, token or time budget
TRIALS_PER_ACTOR = 2  # trials in flight per actor (the pool keeps two calls per actor)
TRIAL_RESOURCES = {"cpu": 0, "memory": 2**20}  # Tune needs some resource; a trial only waits on the mailbox
RESULT_FILE = "sparsealloc-result.json"  # a finished experiment's result, reused by --resume
_SPENT: dict[str, Callable[[], bool]] = {}  # per live experiment: whether its budget is spent (see _Spent)


def make_sampler(name: str, seed: int, in_flight: int = 1) -> optuna.samplers.BaseSampler:
    """Optuna's TPE (multivariate), or CMA-ES (for many continuous keys, e.g. free vectors). With more
    than one trial ``in_flight`` TPE uses the constant liar, so concurrent trials spread out."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=in_flight > 1)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise SparseAllocError(f"unknown Optuna sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def to_distributions(space: Space) -> dict[str, BaseDistribution]:
    """Our neutral search-space description → Optuna distributions (flat keys, bounds inclusive)."""
    out: dict[str, BaseDistribution] = {}
    for name, (kind, low, high) in space.items():
        if kind == "uniform":
            out[name] = FloatDistribution(low, high)
        elif kind == "loguniform":
            out[name] = FloatDistribution(low, high, log=True)
        elif kind == "int":
            out[name] = IntDistribution(int(low), int(high))
        else:
            raise SparseAllocError(f"unknown search-space kind {kind!r} for {name}")
    return out


def fidelity_rungs(requested: tuple[int, ...], top_tokens: int, window_tokens: int) -> list[int]:
    """The rungs a trial climbs: the requested token counts below ``top_tokens`` rounded up to whole
    fitness windows, then ``top_tokens`` itself (the last rung scores every fitness token)."""
    rungs = sorted({min(top_tokens, math.ceil(r / window_tokens) * window_tokens) for r in requested})
    return [r for r in rungs if r < top_tokens] + [top_tokens]


def make_scheduler(name: str, rungs: list[int]):
    """Tune's trial scheduler over the rungs (``time_attr`` = tokens scored)."""
    factor = max(2, round(rungs[1] / rungs[0])) if len(rungs) > 1 else 2
    common = dict(time_attr="tokens", max_t=rungs[-1], grace_period=rungs[0], reduction_factor=factor)
    if name == "asha":
        return ASHAScheduler(**common)
    if name == "hyperband":
        return AsyncHyperBandScheduler(brackets=3, **common)
    if name == "fifo":
        return FIFOScheduler()
    raise SparseAllocError(f"unknown Tune scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


class _Spent(tune.Stopper):
    """Ends the experiment once its driver's budget is spent. Tune pickles the stopper with the experiment,
    so it holds only the experiment's name and reads the live budget of this process (a restored
    experiment finds the resumed search's budget, not the one it was saved with)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return _SPENT.get(self.name, lambda: False)()


class _Answers:
    """The search-process side of the mailbox (what :func:`serve` drives): charges each question, adds the ones
    the budget pays to the pool's dispatch as they come (one call per actor at a time, so the actor that is
    free takes the next question), answers the rest with None, and keeps each trial's config, the last rung
    answered and its running KL there (the record the result is chosen from: Tune's own may lack a trial's
    last report when the budget stopped the experiment before Tune processed it)."""

    def __init__(self, pool: Charged, driver: str, build: Callable[[dict], Profile], top: int,
                 bar: DriverProgress) -> None:
        self.pool, self.driver, self.build, self.top, self.bar = pool, driver, build, top, bar
        self.dispatch = pool.dispatch(per_actor=1)
        self.spent = False
        self.trials: dict[str, dict] = {}  # trial -> {"config", "rung", "sum" (KL x tokens so far), "kl"}
        self.open: dict[int, tuple[dict, str]] = {}  # question number -> (question, candidate key), being scored
        self.answered: dict[int, float | None] = {}  # question number -> answer, not yet posted

    @property
    def busy(self) -> bool:
        return self.dispatch.busy

    def ask(self, numbered: list[tuple[int, dict]]) -> None:
        """Charge the questions the budget pays and send them to the dispatch; the rest are answered None."""
        budget, batch, tokens = self.pool.budget, [], 0
        for number, question in numbered:
            cost = self.pool.cost(question["tokens"])
            if self.spent or budget.exhausted() or not budget.fits(len(batch) + 1, tokens + cost):
                self.spent = True
                self.answered[number] = None
                continue
            profile = self.build(question["config"])
            params = {**question["config"], "trial": question["trial"], "rung": question["rung"],
                      "skip": question["skip"]}
            candidate = Candidate(profile.sparsities, profile.nm, question["tokens"], "kl", self.driver, params,
                                  skip=question["skip"], granularity=profile.granularity)
            batch.append(candidate)
            self.open[number] = (question, candidate.key)
            tokens += cost
        self.dispatch.add(batch)
        self._collect()

    def step(self, wake: list) -> None:
        """Wait for one score (or a ref of ``wake``) and collect the answers it completes."""
        self.dispatch.step(wake=wake)
        self._collect()

    def finish(self) -> None:
        """Let the questions still being scored (charged already) end, their rows written and recorded."""
        self.dispatch.finish()
        self._collect()

    def ready(self) -> dict[int, float | None]:
        """The answers known since the last call, by question number."""
        answered, self.answered = self.answered, {}
        return answered

    def _collect(self) -> None:
        """Answer every open question whose key the results table now holds."""
        for number, (question, key) in list(self.open.items()):
            row = self.pool.results.get(key)
            if row is not None:
                del self.open[number]
                self.answered[number] = float(row["fitness"])
                self._record(question, float(row["fitness"]))
                self.bar.update()

    def _record(self, question: dict, value: float) -> None:
        """What the trial reports for this rung (``rung_trial``'s running KL, a non-finite KL counted as 1e9)."""
        trial = self.trials.setdefault(question["trial"], {"config": question["config"], "rung": 0, "sum": 0.0})
        trial["sum"] += (value if math.isfinite(value) else 1e9) * question["tokens"]
        trial["rung"] = question["rung"]
        trial["kl"] = trial["sum"] / (question["skip"] + question["tokens"])
        if question["skip"] + question["tokens"] == self.top:
            self.bar.update(trial["kl"])


def run_tune(pool: Charged, driver: str, space: Space, build: Callable[[dict], Profile], rungs: list[int],
             seed: int = 0, scheduler: str = "asha", sampler: str = "tpe", experiment: Path | None = None,
             max_concurrent: int | None = None, trials: int | None = None,
             progress: bool = True) -> DriverResult:
    """A Tune experiment over ``space`` (``build`` turns a trial's config into a profile) whose trials
    climb ``rungs`` through the pool, until the budget is spent or ``num_samples`` trials ran; its
    directory is ``experiment``: a finished experiment there (same settings and limits) is reused, an
    interrupted one replayed from its seed (see the module doc). ``trials``: Tune's
    ``num_samples`` (default: the evaluation budget, else unlimited, else 20). Returns the best profile
    among the trials that reached the highest rung any trial reached, with its running KL there."""
    budget = pool.budget
    if budget.exhausted() or not budget.fits(1, pool.cost(rungs[0])):
        raise SparseAllocError(f"no budget left for the {driver} search")
    concurrency = max_concurrent if max_concurrent is not None else TRIALS_PER_ACTOR * len(pool.actors)
    if concurrency < 1:
        raise SparseAllocError(f"the {driver} search needs at least one trial at a time, got {concurrency}")
    unlimited = budget.max_evals is None and budget.max_tokens is None and budget.max_seconds is None
    samples = trials or (DEFAULT_TRIALS if unlimited else (budget.remaining_evals() or -1))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C is the search's to handle
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a trial the budget ends reports nothing
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no banner, our progress line instead
    # A trial the stopper ends before its first report has no result file: Tune warns of each, expected here.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    experiment = Path(experiment) if experiment is not None else None
    name = str(experiment) if experiment is not None else f"{driver}-{id(pool)}"
    details = {"scheduler": scheduler, "sampler": sampler, "concurrency": concurrency, "rungs": rungs, "seed": seed,
               "experiment": str(experiment) if experiment else None, "limits": _limits(budget)}
    finished = _finished(experiment, details, budget, build, driver)
    if finished is not None:
        return finished
    if experiment is not None and experiment.exists():  # interrupted: replayed from its seed (see module doc)
        log.info("%s: replaying the interrupted Tune experiment in %s from its seed; the results table answers "
                 "every rung it scored", driver, experiment)
        shutil.rmtree(experiment)
    mailbox = Mailbox.remote()
    trainable = tune.with_resources(tune.with_parameters(rung_trial, mailbox=mailbox, rungs=rungs),
                                    TRIAL_RESOURCES)
    search = OptunaSearch(space=to_distributions(space), metric="kl", mode="min",
                          sampler=make_sampler(sampler, seed, concurrency))
    config = tune.TuneConfig(search_alg=ConcurrencyLimiter(search, max_concurrent=concurrency),
                             scheduler=make_scheduler(scheduler, rungs), metric="kl", mode="min",
                             num_samples=samples, time_budget_s=budget.max_seconds, reuse_actors=True)
    run = tune.RunConfig(name=experiment.name if experiment else None,
                         storage_path=str(experiment.parent) if experiment else None, stop=_Spent(name),
                         verbose=0, failure_config=tune.FailureConfig(fail_fast=True))
    tuner = tune.Tuner(trainable, tune_config=config, run_config=run)
    if experiment is not None:
        log.info("%s: Tune experiment in %s (tensorboard --logdir %s)", driver, experiment, experiment.parent)
    bar = DriverProgress(driver, budget, progress)
    answers = _Answers(pool, driver, build, rungs[-1], bar)
    _SPENT[name] = lambda: answers.spent or budget.exhausted()
    outcome: dict = {}

    def fit() -> None:
        try:
            tuner.fit()
        except BaseException as exc:  # handed to the search's thread
            outcome["error"] = exc

    fitting = threading.Thread(target=fit, name=f"tune-{driver}", daemon=True)
    fitting.start()
    try:
        serve(mailbox, answers, fitting.is_alive)
        answers.finish()
    except BaseException:
        answers.dispatch.cancel()
        raise
    finally:
        answers.spent = True  # the stopper ends the experiment; open questions get None
        ray.get(mailbox.close.remote())
        fitting.join(timeout=120)
        bar.close()
        _SPENT.pop(name, None)
        ray.kill(mailbox)
    if "error" in outcome:
        raise SparseAllocError(f"the {driver} Tune experiment failed: {outcome['error']}") from outcome["error"]
    result = _best(driver, build, answers.trials, rungs, details)
    if experiment is not None:
        write_json(experiment / RESULT_FILE, {"kl": result.fitness, "evaluations": result.evaluations,
                                              "details": result.details, "used_evals": budget.used_evals,
                                              "used_tokens": budget.used_tokens})
    return result


def _limits(budget) -> dict:
    """The evaluation and token limits a driver's experiment ran under (a finished one is reused only under
    the same limits: a resume with a larger budget runs it again, the table answering what it scored)."""
    return {"evals": budget.max_evals, "tokens": budget.max_tokens}


def _finished(experiment: Path | None, details: dict, budget, build: Callable[[dict], Profile],
              driver: str) -> DriverResult | None:
    """The result of the experiment a resumed run finished before, under the same settings and limits, with
    its spend charged to ``budget`` again (so the drivers after it get what they got); else None."""
    record = experiment / RESULT_FILE if experiment is not None else None
    if record is None or not record.exists():
        return None
    saved = json.loads(record.read_text())
    if {k: saved["details"].get(k) for k in details} != json.loads(json.dumps(details)):
        return None
    log.info("%s: the Tune experiment in %s finished before; its result is reused", driver, experiment)
    budget.charge(saved["used_evals"], saved["used_tokens"])
    return DriverResult(driver, build(saved["details"]["best_config"]), saved["kl"], saved["evaluations"],
                        saved["details"])


def _best(driver: str, build: Callable[[dict], Profile], trials: dict[str, dict], rungs: list[int],
          details: dict) -> DriverResult:
    """The lowest running KL among the trials at the highest rung reached (the first such trial on a tie),
    and how far each trial got."""
    if not trials:
        raise SparseAllocError(f"the {driver} search scored no trial")
    top = max(trial["rung"] for trial in trials.values())
    best = min((trial for trial in trials.values() if trial["rung"] == top), key=lambda trial: trial["kl"])
    rung_counts = {rung: sum(1 for t in trials.values() if t["rung"] == rung) for rung in range(1, len(rungs) + 1)}
    return DriverResult(driver, build(best["config"]), best["kl"], len(trials),
                        {**details, "trials": len(trials), "trials_per_last_rung": rung_counts,
                         "best_config": best["config"]})


def _tune(context: "DriverContext", driver: str, space: Space, build: Callable[[dict], Profile],
          sampler: str = "tpe") -> DriverResult:
    settings = context.settings
    config = settings.config
    if context.granularity != "block" and driver != "tune-free":
        space, build = _with_group_shift(context, space, build)
    rungs = fidelity_rungs(config.tune_rungs, context.top_tokens, config.fitness_seqlen)
    return run_tune(context.pool, driver, space, build, rungs, config.seed, config.tune_scheduler, sampler,
                    context.experiments / driver if context.experiments else None, config.tune_concurrency,
                    progress=config.progress)


SHIFT_KEY = "attn_shift"  # at a finer granularity: how much sparser attention is than the MLP of each block
SHIFT_RANGE = 0.2


def _with_group_shift(context: "DriverContext", space: Space,
                      build: Callable[[dict], Profile]) -> tuple[Space, Callable[[dict], Profile]]:
    """A block family searched at group or linear granularity: its profile lifted to the units, plus one
    hyper-parameter, attention's sparsity minus the MLP's in every block (each block's mean kept)."""
    granularity, layout = context.granularity, context.layout
    groups, blocks, weights = layout.groups(granularity), layout.block_of(granularity), context.unit_weights()
    target = context.settings.config.sparsity

    def shifted(config: dict) -> Profile:
        lifted = context.at_granularity(build(config))
        return families.group_shift(lifted, groups, blocks, weights, target, config[SHIFT_KEY])

    return {**space, SHIFT_KEY: ("uniform", -SHIFT_RANGE, SHIFT_RANGE)}, shifted


def run_atp(context: "DriverContext") -> DriverResult:
    """``tune-atp``: ATP's common difference β."""
    n, target = context.pool.num_blocks, context.settings.config.sparsity
    return _tune(context, "tune-atp", families.atp_space(n, target), lambda c: families.atp(n, target, c["beta"]))


def run_owl(context: "DriverContext") -> DriverResult:
    """``tune-owl``: OWL's λ and outlier multiplier M (the ratios of every M counted by the actors)."""
    from orchestrator.search.drivers.sensitivities import OWL_M_CHOICES, outlier_ratios

    settings, target = context.settings, context.settings.config.sparsity
    ratios = {m: outlier_ratios(context.pool, settings, context.calibration, context.sensitivities, m)
              for m in OWL_M_CHOICES}
    space = families.owl_space(OWL_M_CHOICES)
    return _tune(context, "tune-owl", space, lambda c: families.owl(ratios[int(c["M"])], target, c["lam"]))


def run_fisher(context: "DriverContext") -> DriverResult:
    """``tune-fisher``: the strength of the Fisher map."""
    from orchestrator.search.drivers.sensitivities import fisher_traces

    settings, pool = context.settings, context.pool
    fisher = fisher_traces(pool, settings, context.calibration, context.sensitivities)
    target, weights = settings.config.sparsity, pool.block_weights
    return _tune(context, "tune-fisher", families.sensitivity_space(),
                 lambda c: families.sensitivity_map(fisher, target, c["strength"], weights))


def run_free(context: "DriverContext") -> DriverResult:
    """``tune-free``: one key per block (per attention/MLP group at ``--granularity group`` or ``linear``,
    a group's linears sharing its level), projected onto the target mean and the bounds (TPE or CMA-ES)."""
    pool, config = context.pool, context.settings.config
    target, lo, hi = config.sparsity, max(0.0, config.sparsity - 0.25), min(0.99, config.sparsity + 0.25)
    unit = "block" if context.granularity == "block" else "group"
    weights = pool.block_weights if unit == "block" else context.layout.weights(unit)
    keys = families.free_keys(len(weights))

    def build(c: dict) -> Profile:
        profile = families.free_vector([c[k] for k in keys], target, weights, lo, hi, unit)
        return context.at_granularity(profile)

    return _tune(context, "tune-free", families.free_space(len(weights), lo, hi), build, config.free_sampler)
