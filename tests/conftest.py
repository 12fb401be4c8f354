"""Tiny randomly initialised models (LLaMA and OPT, built from configs) and a synthetic corpus."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
import torch

from pruning.cache import cache_root

# The user's cache, for the tests that ask for it (the real model's assets); every other test, and
# every Ray worker a module fixture starts before the per-test isolation below, writes elsewhere.
USER_CACHE = cache_root()
os.environ["SPARSEALLOC_CACHE"] = tempfile.mkdtemp(prefix="sparsealloc-test-cache-")

# Under xdist (`make test`: 3 workers on CI's 2 cores, beside Ray actors) one torch thread per worker, and per
# process it starts: with two, every small op's OpenMP barrier waits for a thread the scheduler gave to another
# worker. tests/test_real_model.py beside a benchmark's two actors: 133 s with one thread, not done in 870 s
# with the default two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Tests that run minutes on CI (multi-node clusters, the real model): each worker starts with its share.
HEAVY_MARKERS = ("cluster", "real_model")


def pytest_collection_modifyitems(config, items) -> None:
    """Under xdist's worksteal (`make test`) each worker is first sent a contiguous part of the collection;
    put the heavy tests at the head of the parts, one part after another in collection order, so they run
    side by side from the start instead of one worker's queue ending the suite with them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    is_heavy = [any(item.get_closest_marker(name) for name in HEAVY_MARKERS) for item in items]
    heavy = [item for item, flag in zip(items, is_heavy) if flag]
    rest = [item for item, flag in zip(items, is_heavy) if not flag]
    sizes, left = [], len(items)
    for remaining in range(workers, 0, -1):  # worksteal's first split: len(pending) // nodes remaining
        sizes.append(left // remaining)
        left -= sizes[-1]
    parts = [heavy[k::workers] for k in range(workers)]
    for part, size in zip(parts, sizes):
        take = max(size - len(part), 0)
        part += rest[:take]
        rest = rest[take:]
    parts[-1] += rest
    items[:] = [item for part in parts for item in part]


WORDS = [f"w{i}" for i in range(120)]


def _corpus_text(documents: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        # A little structure (bigram preference) so a model has something to predict.
        word = rng.choice(WORDS)
        words = [word]
        for _ in range(rng.randint(30, 80)):
            word = WORDS[(WORDS.index(word) + rng.choice([1, 1, 2, 7])) % len(WORDS)] if rng.random() < 0.8 else rng.choice(WORDS)
            words.append(word)
        docs.append(" ".join(words))
    return "\n\n".join(docs)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


VOCAB = len(WORDS) + 3


def tiny_llama_config(layers: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False)


def tiny_opt_config(layers: int = 3):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                     word_embed_proj_dim=64, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2)


def tiny_gemma3_config():
    """Gemma 3 text: alternating sliding-window / global attention, scaled embeddings, softcapping."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                         "full_attention"], max_position_embeddings=256)


def build_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def save_model_dir(model, path: Path) -> Path:
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(_corpus_text())
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_model_dir(build_model(tiny_llama_config()), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory) -> Path:
    return save_model_dir(build_model(tiny_opt_config()), tmp_path_factory.mktemp("opt"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Tests never touch the user's asset cache unless they ask for it (the real-model test does)."""
    monkeypatch.setenv("SPARSEALLOC_CACHE", str(tmp_path / "cache"))


def settings_of(config, device: str = "cpu", dtype: str = "fp32", level_source: str = "wanda",
                evaluator: str = "resident", actors: int | None = 1):
    """The resolved settings of a search ``config`` without Ray or a memory plan (CPU, fp32, rank tables)."""
    from orchestrator.search.registry import driver_plan
    from orchestrator.search.settings import Settings

    return Settings(config, device, dtype, level_source, driver_plan(config.method, config.shares), evaluator, actors)


SHARED_RAY_CPUS = 4


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for a module's in-process commands (``main([...])``): a search joins a running Ray instead
    of starting its own, so Ray starts once and the final passes' task workers stay warm (torch imported).
    Commands run as subprocesses still start their own."""
    import ray

    _start_shared_ray()
    yield
    ray.shutdown()


@pytest.fixture
def own_ray():
    """For a test whose commands must start their own Ray (their workers inherit an environment the test sets):
    the module's shared Ray is stopped for the test and started again after it."""
    import ray

    shared = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if shared:
        _start_shared_ray()


def _start_shared_ray() -> None:
    from orchestrator.runtime.cluster import start_local

    start_local(num_cpus=SHARED_RAY_CPUS)


def fragile_pool(tmp_path_factory):
    """A local Ray (3 CPUs) and an evaluator pool of two CPU actors over a tiny LLaMA whose block 0 is fragile
    (pruning it hurts far more than the others): 4 fitness windows of 32 tokens. A generator for a module
    fixture (``yield from``)."""
    import ray

    from orchestrator.runtime.cluster import start_local
    from orchestrator.runtime.pool import EvaluatorPool, EvaluatorSpec
    from orchestrator.runtime.results import ResultsTable
    from pruning.load import find_blocks, find_linears

    model = build_model(tiny_llama_config())
    for layer in find_linears(find_blocks(model)[0]).values():
        layer.weight.data *= 6.0
    model_dir = save_model_dir(model, tmp_path_factory.mktemp("fragile"))
    start_local(num_cpus=3)
    generator = torch.Generator().manual_seed(0)
    pool = EvaluatorPool(EvaluatorSpec(str(model_dir)), torch.randint(3, 120, (4, 32), generator=generator),
                         torch.randint(3, 120, (4, 32), generator=generator),
                         ResultsTable(tmp_path_factory.mktemp("run"), "test"), num_actors=2)
    yield pool
    pool.close()
    ray.shutdown()
