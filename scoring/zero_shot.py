"""Zero-shot accuracy of an in-memory (pruned) model with lm-evaluation-harness, on local data only.

Needs the optional extra: ``pip install 'sparsealloc[eval]'`` (``lm-eval``). Tasks are lm-eval task
names: YAML tasks in ``include_path`` (a directory of task YAMLs whose data are local files, e.g.
``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: /abs/path/questions.jsonl}}``) or
built-in lm-eval tasks whose datasets are already in the local ``datasets`` cache. Nothing is
downloaded: the Hugging Face hub and datasets are switched to offline mode for the call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch

from core.errors import SparseAllocError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sparsealloc[eval]'  (or: pip install lm-eval)"
METRICS = ("acc", "acc_norm")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        raise SparseAllocError(f"zero-shot evaluation needs lm-evaluation-harness, which is not installed "
                               f"({exc}): {INSTALL_HINT}") from exc
    return lm_eval


@contextlib.contextmanager
def offline():
    """Hub and datasets offline for the duration: the environment variables, and the module-level
    flags that ``huggingface_hub`` and ``datasets`` read from them at import time."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {name: os.environ.get(name) for name in names}
    patched: list[tuple[object, str, object]] = []
    for module_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        try:
            module = __import__(module_name, fromlist=["_"])
        except ImportError:
            continue
        for attr in attrs:
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _task_manager(tasks: list[str], include_path: str | None):
    """A TaskManager that knows every task in ``tasks`` (only ``include_path``'s tasks when they are
    all there: indexing lm-eval's thousands of built-in tasks takes seconds), and the tasks found
    under ``include_path``."""
    from lm_eval.tasks import TaskManager

    local: list[str] = []
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise SparseAllocError(f"--zero-shot-include {include_path} is not a directory of lm-eval task YAMLs")
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        local = list(manager.all_tasks)
        if all(task in local for task in tasks):
            return manager, local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = (f"tasks under {include_path}: {', '.join(local) if local else 'none'}" if include_path is not None
                 else "give --zero-shot-include DIR with task YAMLs for local data")
        raise SparseAllocError(f"unknown zero-shot task(s) {', '.join(unknown)}; {where} "
                               f"(lm-eval's {len(manager.all_tasks) - len(local)} built-in tasks need their "
                               "datasets in the local datasets cache)")
    return manager, local


def _load_task(manager, name: str, include_path: str | None, local: list[str]):
    """The task's object (its data loaded), or a clear error when its data are not on this machine."""
    try:
        loaded = manager.load([name])
    except Exception as exc:  # datasets raises many types for missing / unreachable data
        message = str(exc).splitlines()[0] if str(exc) else ""
        hint = (f"lm-eval task {name!r} could not load its data ({type(exc).__name__}: {message}). "
                "Only local data can be used: point the task YAML's dataset_kwargs.data_files at files "
                "on this machine (absolute paths), or have the dataset in the local datasets cache.")
        if include_path is not None:
            hint += f" Tasks under {include_path}: {', '.join(local) if local else 'none'}."
        raise SparseAllocError(hint) from exc
    if len(loaded["tasks"]) == 1 and not loaded.get("groups"):
        return next(iter(loaded["tasks"].values()))
    return name  # a group or tag: simple_evaluate builds it (with its aggregation) itself


def _clean(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def summarize(results: dict, tasks: list[str]) -> dict:
    """{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" (those present), "samples"}} from
    lm-eval's results, for each requested task (a group: its aggregate, samples summed)."""
    per_task = results.get("results", {})
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})
    summary = {}
    for task in tasks:
        row = per_task.get(task, {})
        entry: dict = {}
        for metric in METRICS:
            for key, value in row.items():
                name, _, _filter = key.partition(",")
                if name == metric and _clean(value) is not None:
                    entry[metric] = _clean(value)
                elif name == f"{metric}_stderr" and _clean(value) is not None:
                    entry[f"{metric}_stderr"] = _clean(value)
        counted = [n_samples[t]["effective"] for t in (subtasks.get(task) or [task]) if t in n_samples]
        entry["samples"] = int(sum(counted)) if counted else None
        summary[task] = entry
    return summary


def _check_args(tasks: list[str], limit: int | None) -> list[str]:
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise SparseAllocError("no zero-shot tasks given")
    if limit is not None and limit < 1:
        raise SparseAllocError(f"--zero-shot-limit must be at least 1, got {limit}")
    return tasks


def check_available(tasks: list[str], include_path: str | Path | None = None, limit: int | None = None) -> None:
    """Raise the error :func:`zero_shot_accuracy` would raise for a missing lm-eval, an unknown task or
    task data not on this machine — before a long pruning pass rather than after it."""
    _require_lm_eval()
    tasks = _check_args(tasks, limit)
    include = str(Path(include_path).expanduser()) if include_path is not None else None
    with offline():
        manager, local = _task_manager(tasks, include)
        for task in tasks:
            _load_task(manager, task, include, local)


def zero_shot_accuracy(model, tokenizer, tasks: list[str], include_path: str | Path | None = None,
                       limit: int | None = None, device: torch.device | str | None = None,
                       batch_size: int = 4) -> dict:
    """Zero-shot accuracy of ``model`` (in memory, e.g. just pruned) on lm-eval ``tasks``:
    ``{task: {"acc": …, "acc_norm": … (when the task has it), "acc_stderr": …, "samples": n}}``.

    ``include_path``: directory of task YAMLs (local data). ``limit``: at most this many examples per
    task. ``device``: where the model is (it must be wholly there; default: where its weights are).
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = _check_args(tasks, limit)
    include = str(Path(include_path).expanduser()) if include_path is not None else None
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise SparseAllocError(f"zero-shot evaluation needs the whole model on one device; its weights are on "
                               f"{', '.join(sorted(map(str, devices)))} (block offloading): use --offload off")
    if device is not None and torch.device(device).type != next(iter(devices)).type:
        model.to(device)

    with offline():
        manager, local = _task_manager(tasks, include)
        built = [_load_task(manager, task, include, local) for task in tasks]
        was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            results = simple_evaluate(model=lm, tasks=built, limit=limit, task_manager=manager,
                                      bootstrap_iters=1000, log_samples=False, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        finally:
            model.train(was_training)
            if use_cache is not None:
                model.config.use_cache = use_cache
    if results is None:
        raise SparseAllocError("lm-eval returned no results")
    summary = summarize(results, tasks)
    for task, entry in summary.items():
        if "acc" not in entry:
            raise SparseAllocError(f"zero-shot task {task!r} reports no accuracy (its metrics: "
                                   f"{', '.join(results.get('results', {}).get(task, {})) or 'none'}); "
                                   "use multiple-choice tasks with metric acc")
    return summary
