"""Text corpora → disjoint calibration / validation / test documents → token windows.

Split rule (identical on every machine): a document goes to a split by the first 8 hex digits
of sha256 of its key (the article title for the default corpus, else its text), as a fraction
of 2**32: below 0.8 → calibration, below 0.9 → validation, else test. A ``datasets`` dataset
with its own train / validation / test splits keeps them (train is the calibration source).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import SparseAllocError

log = logging.getLogger(__name__)

DEFAULT_DATA = "default"
SPLITS = ("calibration", "validation", "test")
SPLIT_BOUNDS = (0.8, 0.9)
TEXT_FIELDS = ("text", "extract", "content", "document", "article")
DOC_SEPARATOR = "\n\n"


def split_of(key: str) -> str:
    """The split a document with this key belongs to (deterministic, machine-independent)."""
    fraction = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    if fraction < SPLIT_BOUNDS[0]:
        return "calibration"
    return "validation" if fraction < SPLIT_BOUNDS[1] else "test"


def split_documents(keyed_docs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Assign (key, text) documents to splits, keeping each split sorted by key."""
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for key, text in sorted(keyed_docs):
        if text.strip():
            splits[split_of(key)].append(text)
    return splits


def _pick_field(columns, text_field: str | None, source: str) -> str:
    if text_field:
        if text_field not in columns:
            raise SparseAllocError(f"{source} has no field {text_field!r}; its fields: {sorted(columns)}")
        return text_field
    for name in TEXT_FIELDS:
        if name in columns:
            return name
    raise SparseAllocError(f"{source}: no text field found among {sorted(columns)}; pass --text-field")


def _default_corpus() -> list[tuple[str, str]]:
    from pruning.assets import default_corpus_file

    articles = json.loads(default_corpus_file().read_text(encoding="utf-8"))
    return [(title, entry.get("extract", "")) for title, entry in articles.items()]


def _read_text(path: Path) -> str:
    """A local data file as UTF-8 text; bytes that are not are an error naming the file and the offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 4]
        raise SparseAllocError(f"{path} is not UTF-8 text: the byte at offset {exc.start} ({bad!r}…) cannot be "
                               "decoded; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _json_lines(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise SparseAllocError(f"{path} line {number} is not JSON ({exc}); fix or remove it") from None
    return rows


def _local_file(path: Path, text_field: str | None) -> list[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        docs = [d for d in _read_text(path).split("\n\n") if d.strip()]
        return [(doc, doc) for doc in docs]
    if suffix == ".jsonl":
        rows = _json_lines(path)
        if not rows:
            return []
        field = _pick_field(rows[0].keys(), text_field, str(path))
        return [(str(row.get(field, "")), str(row.get(field, ""))) for row in rows]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        field = _pick_field(table.column_names, text_field, str(path))
        return [(str(t), str(t)) for t in table.column(field).to_pylist() if t]
    raise SparseAllocError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .parquet")


def _hf_dataset(spec: str, text_field: str | None) -> dict[str, list[str]]:
    """``name`` or ``name:config`` through ``datasets.load_dataset``."""
    import datasets

    name, _, config = spec.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise SparseAllocError(
            f"could not load dataset {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Give 'default', a local .txt/.jsonl/.parquet file, or a datasets name[:config] reachable here."
        ) from exc
    field = _pick_field(next(iter(dataset.values())).column_names, text_field, spec)
    if {"train", "validation", "test"} <= set(dataset):
        mapping = {"calibration": "train", "validation": "validation", "test": "test"}
        return {ours: [t for t in dataset[theirs][field] if t and t.strip()] for ours, theirs in mapping.items()}
    docs = [(t, t) for split in dataset.values() for t in split[field] if t]
    return split_documents(docs)


def load_documents(spec: str = DEFAULT_DATA, text_field: str | None = None) -> dict[str, list[str]]:
    """Documents per split from ``default``, a local file, or a ``datasets`` dataset."""
    if spec == DEFAULT_DATA:
        splits = split_documents(_default_corpus())
    elif Path(spec).expanduser().exists():
        splits = split_documents(_local_file(Path(spec).expanduser(), text_field))
    elif spec.endswith((".txt", ".jsonl", ".parquet")) or spec.startswith((".", "/", "~")):
        raise SparseAllocError(f"data file {spec} does not exist")
    else:
        splits = _hf_dataset(spec, text_field)
    for name in SPLITS:
        if not splits[name]:
            raise SparseAllocError(f"data {spec!r} gives no {name} documents; the dataset is empty or too small")
    return splits


def tokenize_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents joined by a blank line, as one 1-D token tensor."""
    ids = tokenizer(DOC_SEPARATOR.join(documents), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def random_windows(stream: torch.Tensor, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``seqlen`` tokens (Wanda/SparseGPT calibration protocol)."""
    if stream.numel() <= seqlen:
        raise SparseAllocError(
            f"calibration text has {stream.numel()} tokens, fewer than one window of {seqlen}; "
            "use more data or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (count,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def consecutive_windows(stream: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream (perplexity protocol)."""
    available = stream.numel() // seqlen
    if available == 0:
        raise SparseAllocError(f"evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    count = available if limit is None else min(limit, available)
    return stream[: count * seqlen].view(count, seqlen)


@dataclass(frozen=True)
class TokenData:
    """Token windows for one run, plus the protocol that produced them."""

    calibration: torch.Tensor  # [n_calib, seqlen]
    validation: torch.Tensor  # [n_val, seqlen]
    test: torch.Tensor  # [n_test, seqlen]
    protocol: dict


def prepare_tokens(
    tokenizer,
    spec: str = DEFAULT_DATA,
    *,
    seqlen: int = 2048,
    calib_samples: int = 128,
    eval_windows: int | None = None,
    seed: int = 0,
    text_field: str | None = None,
    validation_windows: int | None = None,
) -> TokenData:
    """Calibration (random windows), validation and test (consecutive windows) token blocks.
    ``eval_windows`` caps the test windows, and the validation windows unless ``validation_windows``
    gives their own cap."""
    if seqlen < 2:
        raise SparseAllocError(f"--seqlen must be at least 2, got {seqlen}")
    if calib_samples < 1:
        raise SparseAllocError(f"--calib-samples must be at least 1, got {calib_samples}")
    docs = load_documents(spec, text_field)
    streams = {name: tokenize_stream(tokenizer, docs[name]) for name in SPLITS}
    data = TokenData(
        calibration=random_windows(streams["calibration"], calib_samples, seqlen, seed),
        validation=consecutive_windows(streams["validation"], seqlen,
                                       eval_windows if validation_windows is None else validation_windows),
        test=consecutive_windows(streams["test"], seqlen, eval_windows),
        protocol={},
    )
    data.protocol.update(
        data=spec,
        text_field=text_field,
        seqlen=seqlen,
        seed=seed,
        calibration={"split": "calibration", "sampling": "random windows", "samples": calib_samples,
                     "documents": len(docs["calibration"])},
        validation={"split": "validation", "windows": int(data.validation.shape[0]),
                    "documents": len(docs["validation"])},
        test={"split": "test", "windows": int(data.test.shape[0]), "documents": len(docs["test"]),
              "tokens_available": int(streams["test"].numel())},
        split_rule="sha256(key)[:8]/2**32: <0.8 calibration, <0.9 validation, else test",
    )
    return data
