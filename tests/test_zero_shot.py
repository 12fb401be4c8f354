"""Zero-shot accuracy with lm-evaluation-harness (optional extra [eval]) on a tiny local task."""

import json
import os
import sys
from pathlib import Path

import pytest

from core.errors import SparseAllocError

QUESTIONS = 8


def write_task(root: Path, name: str = "tiny_mc", data: Path | None = None) -> Path:
    """A multiple-choice lm-eval task over a local jsonl file: ``root/tasks/<name>.yaml``."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = root / f"{name}.jsonl"
        rows = [{"question": f"w{i} w{i + 1} w{i + 2}", "choices": [f"w{i + 3}", f"w{i + 40}", f"w{i + 80}"],
                 "label": i % 3} for i in range(QUESTIONS)]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / f"{name}.yaml").write_text(f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {root / "hf-datasets"}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return tasks


@pytest.fixture
def llama(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def test_accuracy_of_an_in_memory_model_on_a_local_task(llama, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    from scoring.zero_shot import zero_shot_accuracy

    before = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    include = write_task(tmp_path)
    scores = zero_shot_accuracy(llama, tokenizer, ["tiny_mc"], include, None, "cpu", 4)
    assert set(scores) == {"tiny_mc"}
    entry = scores["tiny_mc"]
    assert 0.0 <= entry["acc"] <= 1.0 and 0.0 <= entry["acc_norm"] <= 1.0
    assert entry["samples"] == QUESTIONS
    assert (entry["acc"] * QUESTIONS) == pytest.approx(round(entry["acc"] * QUESTIONS))  # a fraction of 8
    assert {name: os.environ.get(name) for name in before} == before  # offline mode only for the call

    limited = zero_shot_accuracy(llama, tokenizer, ["tiny_mc"], include, 3, "cpu", 2)
    assert limited["tiny_mc"]["samples"] == 3


def test_unknown_task_lists_the_local_ones(llama, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    from scoring.zero_shot import zero_shot_accuracy

    include = write_task(tmp_path)
    with pytest.raises(SparseAllocError, match=r"unknown zero-shot task\(s\) no_such_task.*tiny_mc"):
        zero_shot_accuracy(llama, tokenizer, ["no_such_task"], include, None, "cpu", 4)
    with pytest.raises(SparseAllocError, match="not a directory"):
        zero_shot_accuracy(llama, tokenizer, ["tiny_mc"], tmp_path / "missing", None, "cpu", 4)


def test_missing_task_data_is_a_clear_error(llama, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    from scoring.zero_shot import check_available, zero_shot_accuracy

    include = write_task(tmp_path, "gone_mc", data=tmp_path / "nowhere.jsonl")
    for call in (lambda: check_available(["gone_mc"], include),
                 lambda: zero_shot_accuracy(llama, tokenizer, ["gone_mc"], include, None, "cpu", 4)):
        with pytest.raises(SparseAllocError, match="gone_mc.*could not load its data.*local"):
            call()


def test_without_lm_eval_the_error_says_how_to_install(llama, tokenizer, tmp_path, monkeypatch):
    from scoring.zero_shot import check_available, zero_shot_accuracy

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    for call in (lambda: check_available(["tiny_mc"], tmp_path),
                 lambda: zero_shot_accuracy(llama, tokenizer, ["tiny_mc"], tmp_path, None, "cpu", 4)):
        with pytest.raises(SparseAllocError, match=r"pip install 'sparsealloc\[eval\]'"):
            call()


def test_prune_records_and_prints_zero_shot_scores(llama_dir, corpus_file, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from orchestrator.cli import main

    include = write_task(tmp_path)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(llama_dir), "--data", str(corpus_file), "--sparsity", "0.5",
                 "--seqlen", "32", "--calib-samples", "4", "--eval-windows", "2", "--device", "cpu",
                 "--no-progress", "--out", str(out), "--zero-shot-tasks", "tiny_mc",
                 "--zero-shot-include", str(include)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["zero_shot"]["tiny_mc"]
    assert 0.0 <= entry["acc"] <= 1.0 and entry["samples"] == QUESTIONS
    assert metrics["protocol"]["zero_shot"]["tasks"] == ["tiny_mc"] and metrics["timings"]["zero_shot_s"] > 0
    assert "zero-shot tiny_mc" in capsys.readouterr().out


def test_run_prune_checks_zero_shot_tasks_before_pruning(llama_dir, corpus_file, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from orchestrator.passes import prune as final_pass
    from orchestrator.passes.prune import PruneConfig, run_prune

    def fail(*args, **kwargs):
        raise AssertionError("pruned although the zero-shot task cannot run")

    monkeypatch.setattr(final_pass, "prune_sequentially", fail)
    write_task(tmp_path, "gone_mc", data=tmp_path / "nowhere.jsonl")
    include = write_task(tmp_path)
    common = dict(model=str(llama_dir), data=str(corpus_file), sparsity=0.5, seqlen=32, calib_samples=4,
                  eval_windows=2, progress=False, device="cpu", zero_shot_include=include)
    with pytest.raises(SparseAllocError, match="gone_mc.*could not load its data"):
        run_prune(PruneConfig(out=tmp_path / "a", zero_shot_tasks=["tiny_mc", "gone_mc"], **common))
    with pytest.raises(SparseAllocError, match="block offloading"):
        run_prune(PruneConfig(out=tmp_path / "b", zero_shot_tasks=["tiny_mc"], offload=True, **common))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
