"""Hugging Face models fetched ahead of time into a shared cache (``sparsealloc fetch --model ID``).

Layout: ``$SPARSEALLOC_MODEL_CACHE/<org>--<name>/`` is a plain Hugging Face model directory
(config, tokenizer, weights) written by ``huggingface_hub.snapshot_download(local_dir=...)``, plus
``.sparsealloc-fetch.json``, written last, which marks it complete. :func:`cached_model_dir`
finds such a directory without any network; ``pruning.load`` uses it for every hub id, so
evaluator actors on cluster nodes never download at search time.

Only what ``from_pretrained`` needs is downloaded: the top-level config / tokenizer / template
files and the safetensors weights (PyTorch ``.bin`` weights only when the repo has no
safetensors; never ``.pth``, ``.msgpack``, ``.h5``, ONNX or GGUF copies, nor sub-folders such as
``original/``). Gated models need ``HF_TOKEN`` (or a ``hf auth login`` token on the machine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from core.errors import SparseAllocError
from pruning.cache import cache_lock, cache_root

log = logging.getLogger(__name__)

MARKER = ".sparsealloc-fetch.json"
# Top-level files from_pretrained may read besides the weights: configs, index files, tokenizers
# (tokenizer.json, tokenizer.model, vocab.json, merges.txt, *.tiktoken) and chat templates.
METADATA_SUFFIXES = (".json", ".model", ".txt", ".tiktoken", ".jinja")
# Fallback when the hub lists no files: the same rule as patterns (sub-folders may come along).
FALLBACK_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def model_cache_dir() -> Path:
    """``$SPARSEALLOC_MODEL_CACHE``, default ``$SPARSEALLOC_CACHE/models`` (``~/.cache/sparsealloc/models``)."""
    root = os.environ.get("SPARSEALLOC_MODEL_CACHE")
    if root:
        return Path(root).expanduser()
    return cache_root() / "models"


def is_repo_id(spec: str) -> bool:
    """``name`` or ``org/name`` in the hub's alphabet (no ``..``, no leading/trailing ``-`` / ``.``)."""
    if not _REPO_ID.match(spec) or ".." in spec or "--" in spec:
        return False
    return not any(part.endswith((".", "-")) for part in spec.split("/"))


def model_dir_of(repo_id: str) -> Path:
    """Where ``repo_id`` lives in the cache (fetched or not)."""
    return model_cache_dir() / repo_id.replace("/", "--")


def cached_model_dir(spec: str) -> Path | None:
    """The completely fetched directory of hub id ``spec``, or None; never touches the network."""
    if not is_repo_id(spec):
        return None
    path = model_dir_of(spec)
    if (path / MARKER).is_file() and (path / "config.json").is_file():
        return path
    return None


def select_files(filenames: list[str]) -> list[str]:
    """The files of a model repo to download: top-level metadata and one weight format.

    safetensors when there are any, else PyTorch ``pytorch_model*.bin``; anything else
    (``.pth``, ``.msgpack``, ``.h5``, ``.onnx``, ``.gguf``, sub-folders) is left on the hub.
    """
    top = [name for name in filenames if "/" not in name]
    if "config.json" not in top:
        raise SparseAllocError("the repo has no config.json at its top level, so it is not a transformers model; "
                               "give the id of a Hugging Face transformers model (e.g. meta-llama/Llama-2-7b-hf)")
    safetensors = [name for name in top if name.endswith(".safetensors")]
    if safetensors:
        weights = safetensors
        # The .bin index would point from_pretrained at files we do not download.
        metadata = [name for name in top if name.endswith(METADATA_SUFFIXES) and not name.endswith(".bin.index.json")]
    else:
        weights = [name for name in top if name.startswith("pytorch_model") and name.endswith(".bin")]
        metadata = [name for name in top if name.endswith(METADATA_SUFFIXES)]
    if not weights:
        raise SparseAllocError("the repo has neither safetensors nor PyTorch (pytorch_model*.bin) weights at its top "
                               "level; sparsealloc loads transformers checkpoints (a .gguf file can be passed to "
                               "--model as a local path)")
    return sorted(set(metadata) | set(weights))


def _hub_error(repo_id: str, exc: BaseException) -> SparseAllocError:
    """A SparseAllocError that says what to fix, for an exception from huggingface_hub."""
    from huggingface_hub import errors

    token_set = bool(os.environ.get("HF_TOKEN"))
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, errors.GatedRepoError) or status in (401, 403):
        if token_set:
            return SparseAllocError(
                f"the Hugging Face hub refused access to {repo_id} with the token in HF_TOKEN ({first_line}). "
                f"Accept the model's conditions at https://huggingface.co/{repo_id} with the account the token "
                "belongs to (approval can take a while), or set HF_TOKEN to a read token of an account that has access."
            )
        return SparseAllocError(
            f"{repo_id} is gated (or private) on the Hugging Face hub and no token was given ({first_line}). Accept "
            f"its conditions at https://huggingface.co/{repo_id}, create a read token at "
            "https://huggingface.co/settings/tokens, then `export HF_TOKEN=hf_...` and run the fetch again."
        )
    if isinstance(exc, errors.RepositoryNotFoundError) or status == 404:
        hint = "" if token_set else "; if it is private, set HF_TOKEN to a token with access"
        return SparseAllocError(f"no model {repo_id!r} on the Hugging Face hub: check the id (org/name, "
                                f"e.g. meta-llama/Llama-2-7b-hf){hint}")
    if isinstance(exc, errors.HFValidationError):
        return SparseAllocError(f"{repo_id!r} is not a Hugging Face model id ({first_line}); give org/name")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return SparseAllocError(f"cannot fetch {repo_id}: HF_HUB_OFFLINE is set; unset it on a machine with network")
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return SparseAllocError(f"the disk filled up while fetching {repo_id} into {model_dir_of(repo_id)}: free space "
                                "or point SPARSEALLOC_MODEL_CACHE at a larger disk, then fetch again (it resumes)")
    return SparseAllocError(
        f"could not fetch {repo_id} from the Hugging Face hub ({type(exc).__name__}: {first_line}). Check this "
        "machine's network access to huggingface.co (or HF_ENDPOINT / proxy settings) and fetch again (it resumes); "
        "offline, copy a model directory here and pass its path to --model instead."
    )


def _is_hub_error(exc: BaseException) -> bool:
    """Errors a fetch can meet that the user fixes (hub answers, network, disk), not our bugs."""
    root = type(exc).__module__.split(".")[0]
    return isinstance(exc, (OSError, ValueError)) or root in ("httpx", "httpx2", "requests", "urllib3")


def _check_disk(repo_id: str, target: Path, sizes: dict[str, int | None], files: list[str]) -> None:
    """Refuse before downloading when the cache's disk cannot hold the missing files."""
    if not files or any(sizes.get(name) is None for name in files):
        return  # sizes unknown: let the download try
    missing = sum(sizes[name] for name in files if not (target / name).is_file())
    probe = target
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if missing > free:
        raise SparseAllocError(
            f"{repo_id} needs {missing / 2**30:.1f} GiB more in {target} but only {free / 2**30:.1f} GiB are free: "
            "free space or point SPARSEALLOC_MODEL_CACHE at a larger disk"
        )


def fetch_model(repo_id: str, force: bool = False) -> Path:
    """Download ``repo_id`` (config, tokenizer, weights) into the cache; the cached directory.

    Idempotent: a completely fetched model is returned without touching the network unless
    ``force`` (then every file is downloaded again). An interrupted fetch resumes. ``HF_TOKEN``
    from the environment is passed on (gated models); without it huggingface_hub falls back to a
    ``hf auth login`` token.
    """
    if not is_repo_id(repo_id):
        raise SparseAllocError(f"{repo_id!r} is not a Hugging Face model id: give org/name, e.g. "
                               "meta-llama/Llama-2-7b-hf (local directories need no fetch)")
    cached = cached_model_dir(repo_id)
    if cached is not None and not force:
        log.info("%s is already in %s", repo_id, cached)
        return cached
    with cache_lock(f"hub-{repo_id}"):  # one download per node; the others wait for it
        cached = cached_model_dir(repo_id)
        if cached is not None and not force:
            return cached
        return _download(repo_id, force)


def _download(repo_id: str, force: bool) -> Path:
    """:func:`fetch_model`'s download, under the cache lock."""
    import huggingface_hub

    target = model_dir_of(repo_id)
    token = os.environ.get("HF_TOKEN") or None
    try:
        info = huggingface_hub.model_info(repo_id, token=token, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - mapped to a message that says what to fix
        if not _is_hub_error(exc):
            raise
        raise _hub_error(repo_id, exc) from exc
    siblings = getattr(info, "siblings", None)
    if siblings:
        sizes = {s.rfilename: getattr(s, "size", None) for s in siblings}
        try:
            files = select_files(list(sizes))
        except SparseAllocError as exc:
            raise SparseAllocError(f"{repo_id}: {exc}") from None
        patterns = files
    else:
        sizes, files, patterns = {}, [], FALLBACK_PATTERNS
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER).unlink(missing_ok=True)
    _check_disk(repo_id, target, sizes, files)
    log.info("fetching %s (%s files) into %s", repo_id, len(files) or "all matching", target)
    try:
        huggingface_hub.snapshot_download(repo_id, revision=getattr(info, "sha", None), local_dir=target,
                                          allow_patterns=patterns, token=token, force_download=force)
    except Exception as exc:  # noqa: BLE001
        if not _is_hub_error(exc):
            raise
        raise _hub_error(repo_id, exc) from exc
    # snapshot_download may hand back an incomplete local_dir when the hub drops mid-way.
    absent = [name for name in files if not (target / name).is_file()]
    if absent or not (target / "config.json").is_file():
        raise SparseAllocError(f"the fetch of {repo_id} is incomplete (missing {', '.join(absent[:5]) or 'config.json'}); "
                               "run it again, it resumes")
    if not files and not any(target.glob("*.safetensors")):
        raise SparseAllocError(f"{repo_id} has no safetensors weights at its top level; sparsealloc fetches "
                               "safetensors checkpoints")
    record = {"repo_id": repo_id, "revision": getattr(info, "sha", None), "files": files or sorted(
        str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() and ".cache" not in p.parts)}
    (target / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    return target
