"""The GPU check script: refuses plainly without CUDA, and the commands it runs are ones our CLI accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import gpu_check
from orchestrator.cli import build_parser


def test_without_cuda_it_says_so_and_writes_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA device")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["prune", "search"])
def test_its_sparsealloc_commands_parse(name, tmp_path):
    step = next(s for s in gpu_check.steps(tmp_path, "tag") if s.name == name)
    args = build_parser().parse_args(step.command[3:])
    assert args.command == name and Path(args.out).parent == tmp_path
    assert (args.device == "cuda" and args.offload == "on") if name == "prune" else args.actor_gpus


def test_device_names_become_file_tags():
    assert gpu_check.device_tag("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.device_tag("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_its_search_runs_make_demos_flags():
    """The GPU check's search is the demo's: its flags come from the Makefile, so the two cannot drift."""
    import re

    makefile = (Path(gpu_check.ROOT) / "Makefile").read_text()
    budget = re.search(r"--budget-tokens (\d+)", makefile).group(1)
    flags = gpu_check.demo_flags()
    assert flags[:2] == ["--method", "all"] and flags[flags.index("--budget-tokens") + 1] == budget
    assert flags[-2:] == ["--selection-windows", "8"]  # the continuation line is read too
    step = next(s for s in gpu_check.steps(Path("/tmp"), "tag") if s.name == "search")
    assert step.command[4 : 4 + len(flags)] == flags
