"""`sparsealloc plan`: exact tensor counts from configs alone (meta device) and memory per stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.runtime.plan import GIB, ModelShape, check_plan, load_config, make_plan, render_plan, shape_of
from core.errors import SparseAllocError

LLAMA7_BLOCK_LINEARS = 4 * 4096**2 + 3 * 4096 * 11008  # 202,375,168
LLAMA70_BLOCK_LINEARS = 2 * 8192**2 + 2 * 1024 * 8192 + 3 * 8192 * 28672  # 855,638,016


def _config_dir(factory, name, config):
    path = factory.mktemp(name)
    config.save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]  # no weights, no tokenizer
    return path


@pytest.fixture(scope="module")
def llama7_dir(tmp_path_factory):
    from transformers import LlamaConfig

    return _config_dir(tmp_path_factory, "llama7", LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000))


@pytest.fixture(scope="module")
def llama70_dir(tmp_path_factory):
    from transformers import LlamaConfig

    return _config_dir(tmp_path_factory, "llama70", LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=32000))


@pytest.fixture(scope="module")
def llama7(llama7_dir):
    return shape_of(str(llama7_dir))


@pytest.fixture(scope="module")
def llama70(llama70_dir):
    return shape_of(str(llama70_dir))


def _work(shape: ModelShape, d: int, batch: int = 4, seqlen: int = 128) -> int:
    """Working activations + the logits of one window (the evaluator's head runs per window)."""
    return batch * seqlen * (4 * shape.hidden_size + 2 * shape.intermediate_size) * d * 2 \
        + seqlen * shape.vocab_size * 4 * 3


def test_llama7_counts_are_exact(llama7):
    assert llama7.model_type == "llama"
    assert llama7.num_blocks == 32
    assert (llama7.hidden_size, llama7.intermediate_size, llama7.vocab_size) == (4096, 11008, 32000)
    assert llama7.linear_weights == 6_476_005_376
    assert llama7.block_linear_weights == (LLAMA7_BLOCK_LINEARS,) * 32
    assert llama7.block_elements == (LLAMA7_BLOCK_LINEARS + 2 * 4096,) * 32  # + two RMSNorms
    # untied embeddings and LM head, final norm; buffers are the rotary tables only
    assert llama7.non_block_elements - llama7.non_block_buffers == 2 * 32000 * 4096 + 4096
    assert 0 < llama7.non_block_buffers <= 128
    assert llama7.largest_linear == (11008, 4096)
    assert llama7.largest_input_width == 11008
    assert llama7.block_linear_shapes[0] == ((4096, 4096),) * 4 + ((11008, 4096), (11008, 4096), (4096, 11008))


def test_llama70_counts_are_exact(llama70):
    assert llama70.num_blocks == 80
    assert llama70.linear_weights == 80 * LLAMA70_BLOCK_LINEARS == 68_451_041_280
    assert llama70.non_block_elements - llama70.non_block_buffers == 2 * 32000 * 8192 + 8192
    assert llama70.largest_linear == (28672, 8192)
    assert llama70.largest_input_width == 28672


def test_opt_and_gemma3_count_on_the_meta_device(tmp_path_factory):
    from transformers import Gemma3TextConfig, OPTConfig

    opt = shape_of(str(_config_dir(tmp_path_factory, "opt", OPTConfig(
        vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=16))))
    assert opt.model_type == "opt" and opt.num_blocks == 2 and opt.intermediate_size == 32
    assert opt.block_linear_weights == (4 * 16 * 16 + 2 * 16 * 32,) * 2
    # + biases of q, k, v, out (4·16), fc1 (32), fc2 (16), two LayerNorms with bias (4·16)
    assert opt.block_elements == (2048 + 64 + 32 + 16 + 64,) * 2
    # token embeddings (tied with the LM head: once) + learned positions (64 + 2 offset) + final LayerNorm
    assert opt.non_block_elements == 50 * 16 + 66 * 16 + 2 * 16
    assert opt.largest_input_width == 32

    gemma = shape_of(str(_config_dir(tmp_path_factory, "gemma3", Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16))))
    assert gemma.model_type == "gemma3_text" and gemma.num_blocks == 3
    linears = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96
    assert gemma.block_linear_weights == (linears,) * 3
    assert gemma.block_elements == (linears + 2 * 16 + 4 * 64,) * 3  # + q/k norms and four RMSNorms
    assert gemma.non_block_elements - gemma.non_block_buffers == 256 * 64 + 64  # tied embeddings once
    assert gemma.largest_linear == (96, 64) and gemma.largest_input_width == 96


def test_load_config_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(SparseAllocError, match="no config.json"):
        load_config(str(tmp_path))
    missing = str(tmp_path / "nowhere" / "x.gguf")
    with pytest.raises(SparseAllocError, match="does not exist"):
        load_config(missing)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(SparseAllocError, match="'" + str(tmp_path / "bad") + "'"):
        load_config(str(tmp_path / "bad"))


def test_llama7_bf16_on_80gib_is_resident(llama7):
    plan = make_plan(llama7, dtype="bf16", device_memory_bytes=80 * GIB)
    assert plan.evaluator == "resident" and plan.fits
    check_plan(plan)  # no error
    d, W, T, H = 2, llama7.linear_weights, 1024, 4096
    B = sum(llama7.block_elements) * d
    N = llama7.non_block_elements * d
    cache = 8 * 127 * 32000 * 4  # the dense log-probs of all 8 fitness windows of 128 tokens (under 1 GiB)
    expected = B + N + 2 * W + LLAMA7_BLOCK_LINEARS * d + 32 * T * H * d + T * H * d + cache + _work(llama7, d)
    assert plan.stage("evaluator").device_bytes == expected
    assert plan.stage("rank tables").device_bytes == expected
    assert plan.bytes_per_weight <= 4.0
    assert plan.bytes_per_weight == pytest.approx((B + N + 2 * W + LLAMA7_BLOCK_LINEARS * d) / llama7.total_elements)
    assert [s.name for s in plan.stages] == ["rank tables", "evaluator", "fisher traces", "final pass (wanda)",
                                             "perplexity"]
    # Wanda final pass: N + one block + calibration activations + input norms of one block's linears
    calib = 2 * 32 * 512 * H * d
    block = (LLAMA7_BLOCK_LINEARS + 2 * H) * d
    assert plan.stage("final pass (wanda)").device_bytes == N + block + calib + (6 * 4096 + 11008) * 4
    assert plan.stage("final pass (wanda)").host_bytes == B + N
    assert plan.stage("perplexity").mode == "resident"

    forced = make_plan(llama7, dtype="bf16", device_memory_bytes=80 * GIB, evaluator="streamed")
    assert forced.evaluator == "streamed" and forced.fits
    sparsegpt = make_plan(llama7, dtype="bf16", device_memory_bytes=80 * GIB, pruner="sparsegpt")
    assert sparsegpt.stage("final pass (sparsegpt)").device_bytes == \
        N + block + calib + (6 * 4096**2 + 11008**2) * 4


def test_llama70_bf16_on_80gib_streams(llama70):
    plan = make_plan(llama70, dtype="bf16", device_memory_bytes=80 * GIB)
    assert plan.evaluator == "streamed" and plan.fits
    d, W, T, H, L = 2, llama70.linear_weights, 1024, 8192, 80
    N = llama70.non_block_elements * d
    block = LLAMA70_BLOCK_LINEARS + 2 * H
    one = block * d + 2 * LLAMA70_BLOCK_LINEARS + LLAMA70_BLOCK_LINEARS * d
    evaluator = plan.stage("evaluator")
    cache = 8 * 127 * 32000 * 4
    assert evaluator.device_bytes == N + 2 * one + 8 * T * H * d + T * H * d + cache + _work(llama70, d)
    assert evaluator.host_bytes == L * block * d + 2 * W + L * T * H * d
    assert plan.stage("rank tables").device_bytes == N + block * d + 2 * 32 * 512 * H * d + 28672 * 8192 * 12
    assert plan.stage("perplexity").mode == "block by block"  # 128 GiB of weights cannot sit on 80 GiB
    # kl-seq fitness: a second set of int16 rank tables where the first lives (the host, streamed).
    sequential = make_plan(llama70, dtype="bf16", device_memory_bytes=80 * GIB, sequential_fitness=True)
    assert sequential.stage("evaluator").host_bytes == evaluator.host_bytes + 2 * W
    assert sequential.stage("evaluator").device_bytes == evaluator.device_bytes


def test_sequential_fitness_adds_a_rank_set_to_a_resident_evaluator(llama7):
    plain = make_plan(llama7, dtype="bf16", device_memory_bytes=80 * GIB)
    sequential = make_plan(llama7, dtype="bf16", device_memory_bytes=80 * GIB, sequential_fitness=True)
    assert sequential.stage("evaluator").device_bytes == plain.stage("evaluator").device_bytes + 2 * llama7.linear_weights
    split = make_plan(llama7, dtype="bf16", device_memory_bytes=80 * GIB, gpus_per_actor=2, evaluator="resident")
    split_seq = make_plan(llama7, dtype="bf16", device_memory_bytes=80 * GIB, gpus_per_actor=2, evaluator="resident",
                          sequential_fitness=True)
    assert split_seq.stage("evaluator").device_bytes == split.stage("evaluator").device_bytes + \
        -(-2 * llama7.linear_weights // 2)


def test_llama70_resident_needs_more_gpus(llama70):
    plan = make_plan(llama70, dtype="bf16", device_memory_bytes=80 * GIB, evaluator="resident")
    assert plan.evaluator == "resident" and not plan.fits
    assert not plan.stage("evaluator").fits and plan.stage("fisher traces").fits
    assert plan.resident_gpus_needed == 4
    with pytest.raises(SparseAllocError) as err:
        check_plan(plan)
    message = str(err.value)
    assert "--gpus-per-actor 4" in message and "--evaluator streamed" in message
    assert f"needs {plan.stage('evaluator').device_bytes / GIB:.2f} GiB" in message
    assert "--dtype bf16" not in message  # already bf16

    eight = make_plan(llama70, dtype="bf16", device_memory_bytes=80 * GIB, evaluator="resident", gpus_per_actor=8)
    assert eight.fits and eight.evaluator == "resident"
    d, T, H = 2, 1024, 8192
    split = sum(llama70.block_elements) * d + 2 * llama70.linear_weights
    expected = -(-split // 8) + llama70.non_block_elements * d + LLAMA70_BLOCK_LINEARS * d + 81 * T * H * d \
        + 8 * 127 * 32000 * 4 + _work(llama70, d)
    assert eight.stage("evaluator").device_bytes == expected
    auto = make_plan(llama70, dtype="bf16", device_memory_bytes=80 * GIB, gpus_per_actor=8)
    assert auto.evaluator == "resident"


def test_budget_below_one_block_fails_naming_the_size(llama7):
    block = sum(llama7.block_elements) // 32 * 2
    plan = make_plan(llama7, dtype="bf16", device_memory_bytes=block - 1)
    assert plan.evaluator == "streamed" and not plan.fits
    assert not any(s.fits for s in plan.stages)
    with pytest.raises(SparseAllocError) as err:
        check_plan(plan)
    message = str(err.value)
    for stage in plan.stages:
        assert f"{stage.name} ({stage.mode}): needs {stage.device_bytes / GIB:.2f} GiB" in message
    assert f"a device with at least {plan.streamed_bytes / GIB:.2f} GiB" in message
    assert "--device-memory-gb" in message


def test_fp32_advice_and_bad_arguments(llama7):
    plan = make_plan(llama7, dtype="fp32", device_memory_bytes=32 * GIB, evaluator="resident")
    assert not plan.fits
    with pytest.raises(SparseAllocError, match="--dtype bf16"):
        check_plan(plan)
    with pytest.raises(SparseAllocError, match="unknown dtype"):
        make_plan(llama7, dtype="int8", device_memory_bytes=GIB)
    with pytest.raises(SparseAllocError, match="--gpus-per-actor"):
        make_plan(llama7, dtype="bf16", device_memory_bytes=GIB, gpus_per_actor=0)
    with pytest.raises(SparseAllocError, match="evaluator mode"):
        make_plan(llama7, dtype="bf16", device_memory_bytes=GIB, evaluator="sideways")


def test_host_budget_is_checked_when_given(llama70):
    plan = make_plan(llama70, dtype="bf16", device_memory_bytes=80 * GIB, host_memory_bytes=64 * GIB)
    assert plan.stage("evaluator").device_bytes <= 80 * GIB and not plan.stage("evaluator").fits
    with pytest.raises(SparseAllocError, match="of host memory, host has 64.00 GiB"):
        check_plan(plan)


def test_render_plan_table(llama7):
    plan = make_plan(llama7, dtype="bf16", device_memory_bytes=80 * GIB)
    text = render_plan(plan)
    assert "6,476,005,376 prunable" in text and "resident (auto)" in text
    assert "units       32 blocks, 64 groups, 224 linears (--granularity)" in text
    evaluator = plan.stage("evaluator")
    row = [line for line in text.splitlines() if line.startswith("evaluator ")][-1]  # the table row
    assert row.split() == ["evaluator", "resident", f"{evaluator.device_bytes / GIB:.2f}", "0.00", "yes"]
    assert text.splitlines()[-1] == "fits"


def test_cli_plan_on_a_config_only_dir(llama7_dir, llama70_dir, capsys):
    assert main(["plan", "--model", str(llama7_dir), "--device-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "llama: 32 blocks, hidden 4096, intermediate 11008, vocab 32000" in out
    assert "bf16; 80.00 GiB per device" in out and "resident (auto)" in out
    assert out.strip().splitlines()[-1] == "fits"

    assert main(["plan", "--model", str(llama70_dir), "--device-memory-gb", "80", "--evaluator", "resident"]) == 2
    captured = capsys.readouterr()
    assert "does not fit" in captured.out
    assert "--gpus-per-actor 6" in captured.err  # kl-seq's second rank set (search's default)
    assert main(["plan", "--model", str(llama70_dir), "--device-memory-gb", "80", "--evaluator", "resident",
                 "--top-fitness", "kl"]) == 2
    assert "--gpus-per-actor 4" in capsys.readouterr().err

    assert main(["plan", "--model", str(llama70_dir), "--device-memory-gb", "80", "--evaluator", "resident",
                 "--gpus-per-actor", "8", "--pruner", "sparsegpt", "--fitness-windows", "4"]) == 0
    out = capsys.readouterr().out
    assert "8 devices per actor" in out and "final pass (sparsegpt)" in out


def test_cli_plan_defaults_to_this_machine(tmp_path_factory, capsys):
    import torch

    from conftest import tiny_llama_config

    if torch.cuda.is_available():
        pytest.skip("checks the CPU default")
    path = _config_dir(tmp_path_factory, "tiny", tiny_llama_config())
    assert main(["plan", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fp32;" in out and "; host " in out  # CPU actors: fp32, the host is the device


def test_cli_plan_unreadable_model(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "missing-model"), "--device-memory-gb", "80"]) == 2
    assert "missing-model" in capsys.readouterr().err


def test_docs_plan_table_is_what_plan_computes(llama7, llama70):
    """docs/plan.md's LLaMA-2 table (bf16, 80 GiB) holds the figures make_plan gives today."""
    doc = (Path(__file__).parents[1] / "docs" / "plan.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("rank tables", "evaluator", "fisher traces", "final pass (wanda)",
                                            "perplexity"):
            rows[cells[0]] = cells[1:]
    assert len(rows) == 5
    for shape, offset in ((llama7, 0), (llama70, 3)):
        plan = make_plan(shape, dtype="bf16", device_memory_bytes=80 * GIB, fitness_tokens=32 * 128,
                         sequential_fitness=True)  # search's and plan's defaults
        for stage in plan.stages:
            mode, device, host = rows[stage.name][offset : offset + 3]
            assert (mode, device, host) == (stage.mode, f"{stage.device_bytes / GIB:.2f}",
                                            f"{stage.host_bytes / GIB:.2f}"), stage.name
