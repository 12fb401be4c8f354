"""Dense test perplexity, cached across runs.

The dense model's perplexity depends only on the model, the test token windows, the dtype and the
device type (and the torch / transformers versions that compute it), so it is computed once and kept
as a small JSON file ``$SPARSEALLOC_CACHE/dense/<key>.json`` (default ``~/.cache/sparsealloc``),
``<key>`` being the sha256 of those inputs:

- the model: for a local directory or ``.gguf`` file (``default`` and fetched hub ids resolve to
  one), its resolved path, the sha256 of ``config.json`` and the name, size and modification time
  of each weight file — or, for a packaged model (``default``, ``gemma3-270m``), the sha256 of its weights
  recorded (and re-checked) by :func:`pruning.assets.packaged_model_dir`, so a re-conversion does not
  invalidate it. A hub id with no local copy is not cached (its
  revision is unknown here);
- the test windows: their content fingerprint (dtype, shape and bytes);
- the dtype (fp32, bf16, fp16) and the device type (cpu, cuda …).

A file that cannot be read, does not parse or records other inputs is ignored and rewritten; files
are written atomically (temporary file, then rename), so concurrent runs never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

from core.identity import cache_key, fingerprint, write_json
from pruning.cache import cache_root

log = logging.getLogger(__name__)

CACHE_SUBDIR = "dense"
# Bump when the perplexity protocol (scoring.perplexity) changes, so older values are not reused.
PROTOCOL = "ppl-v1: non-overlapping windows, exp(mean NLL over predicted tokens)"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def cache_dir() -> Path:
    return cache_root() / CACHE_SUBDIR


def resolve_model(spec: str) -> str:
    """``spec`` as :func:`pruning.load.load_model` resolves it (``default`` → its cached directory,
    a fetched hub id → its directory); loading the returned string loads the same model."""
    from pruning.load import _resolve_spec

    return _resolve_spec(spec)


def _file_entry(path: Path, recorded_sha256: bool) -> dict:
    stat = path.stat()
    entry = {"name": path.name, "size": stat.st_size}
    record = path.with_name(path.name + ".sha256")
    if path.name == "config.json":  # small: its contents, not its time
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    elif recorded_sha256 and record.is_file():
        entry["sha256"] = record.read_text().strip()
    else:
        entry["mtime_ns"] = stat.st_mtime_ns
    return entry


def model_identity(spec: str) -> dict | None:
    """What identifies the model's weights, or None when it cannot be told without loading (a hub id
    with no local copy): see the module's docstring."""
    from pruning.assets import DEFAULT_MODEL_NAME, PACKAGED_MODELS

    path = Path(resolve_model(spec)).expanduser()
    if not path.exists():
        return None
    path = path.resolve()
    if path.is_file():
        return {"path": str(path), "files": [_file_entry(path, False)]}
    packaged = next((m.name for m in PACKAGED_MODELS.values()
                     if path == (cache_root() / "models" / m.name).expanduser().resolve()), None)
    recorded = packaged is not None  # packaged_model_dir re-hashes the weights against the record on every use
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    identity = {"path": str(path), "files": [_file_entry(p, recorded) for p in files]}
    if recorded:
        identity = {"default" if packaged == DEFAULT_MODEL_NAME else "packaged": packaged, "files": identity["files"]}
    return identity


def dense_inputs(model_spec: str, test_windows: torch.Tensor, dtype: torch.dtype | str,
                 device: torch.device | str) -> dict | None:
    """Everything the dense perplexity depends on, or None when the model cannot be identified."""
    import transformers

    identity = model_identity(model_spec)
    if identity is None:
        return None
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return {"model": identity, "test": fingerprint(test_windows), "dtype": str(dtype),
            "device": torch.device(device).type, "protocol": PROTOCOL,
            "torch": torch.__version__, "transformers": transformers.__version__}


def cache_path(inputs: dict) -> Path:
    return cache_dir() / f"{cache_key(inputs)}.json"


def read_cached(inputs: dict) -> float | None:
    """The stored perplexity for ``inputs``, or None (absent, unreadable, corrupt or other inputs)."""
    path = cache_path(inputs)
    try:
        stored = json.loads(path.read_text())
        value = float(stored["perplexity"])
        same = stored.get("inputs") == json.loads(json.dumps(inputs))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("ignoring unreadable dense perplexity cache file %s (%s)", path, exc)
        return None
    if not same or not math.isfinite(value) or value <= 0:
        log.warning("ignoring dense perplexity cache file %s: it records other inputs or an invalid value", path)
        return None
    return value


def write_cached(inputs: dict, value: float, seconds: float | None = None) -> Path | None:
    """Store ``value`` for ``inputs`` atomically; returns the file, or None when it could not be written
    (a read-only cache is not an error: the value is simply recomputed next time)."""
    path = cache_path(inputs)
    record = {"perplexity": value, "inputs": inputs, "compute_s": seconds,
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_json(path, record)
    except OSError as exc:
        log.warning("could not write the dense perplexity cache %s: %s", path, exc)
        return None
    return path


def cached_dense_perplexity(model_spec: str, test_windows: torch.Tensor, dtype: torch.dtype | str,
                            device: torch.device | str, compute: Callable[[], float],
                            enabled: bool = True) -> tuple[float, bool]:
    """(perplexity, was_cached): the stored value for these inputs, else ``compute()`` (then stored).
    ``enabled`` False always computes and neither reads nor writes the cache."""
    inputs = dense_inputs(model_spec, test_windows, dtype, device) if enabled else None
    if inputs is not None:
        value = read_cached(inputs)
        if value is not None:
            log.info("dense perplexity %.4f from the cache (%s)", value, cache_path(inputs))
            return value, True
    start = time.perf_counter()
    value = float(compute())
    if inputs is not None:
        write_cached(inputs, value, time.perf_counter() - start)
    return value, False
