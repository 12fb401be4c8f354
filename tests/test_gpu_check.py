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
