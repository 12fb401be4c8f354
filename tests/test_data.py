import json

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pruning.data import consecutive_windows, load_documents, prepare_tokens, random_windows, split_documents, split_of


def test_split_rule_is_fixed():
    # Pinned values: the rule must give the same split on every machine and release.
    titles = ("Albert Einstein", "Paris", "Python (programming language)", "Moon")
    assert [split_of(t) for t in titles] == ["calibration", "calibration", "validation", "calibration"]
    assert [split_of(f"doc {i}") for i in (4, 5, 10)] == ["calibration", "test", "validation"]
    assert {split_of(f"doc {i}") for i in range(200)} == {"calibration", "validation", "test"}
    shares = [split_of(f"doc {i}") for i in range(5000)]
    assert abs(shares.count("calibration") / 5000 - 0.8) < 0.03
    assert abs(shares.count("test") / 5000 - 0.1) < 0.02


def test_split_is_disjoint_and_order_independent():
    docs = [(f"title {i}", f"text {i}") for i in range(300)]
    forward, backward = split_documents(docs), split_documents(docs[::-1])
    assert forward == backward
    seen = [t for split in forward.values() for t in split]
    assert len(seen) == len(set(seen)) == 300


def test_local_formats_give_the_same_documents(tmp_path):
    texts = [f"document number {i} with some words" for i in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(texts))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    pq.write_table(pa.table({"content": texts}), tmp_path / "c.parquet")
    loaded = [load_documents(str(tmp_path / f"c.{ext}")) for ext in ("txt", "jsonl", "parquet")]
    assert loaded[0] == loaded[1] == loaded[2]


def test_windows():
    stream = torch.arange(1000)
    a, b = random_windows(stream, 5, 64, seed=1), random_windows(stream, 5, 64, seed=1)
    assert torch.equal(a, b) and a.shape == (5, 64)
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 64)) for w in a)
    windows = consecutive_windows(stream, 100, limit=4)
    assert windows.shape == (4, 100) and torch.equal(windows.flatten(), torch.arange(400))


def test_prepare_tokens_records_protocol(tokenizer, corpus_file):
    data = prepare_tokens(tokenizer, str(corpus_file), seqlen=16, calib_samples=3, eval_windows=5, seed=7)
    assert data.calibration.shape == (3, 16) and data.test.shape == (5, 16) and data.validation.shape == (5, 16)
    assert data.protocol["seed"] == 7 and data.protocol["seqlen"] == 16
    assert data.protocol["calibration"]["samples"] == 3
