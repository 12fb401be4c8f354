"""The sensitivity → profile → prune chain through the command line, on the tiny LLaMA."""

import json

import pytest

from orchestrator.cli import main


def _common(model_dir, data):
    return ["--model", str(model_dir), "--data", str(data), "--seqlen", "32", "--calib-samples", "4",
            "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("method,extra", [("shapley", ["--estimator", "exact", "--fitness-windows", "2",
                                                       "--fitness-seqlen", "16"]),
                                          ("fisher", []), ("owl", [])])
def test_sensitivity_then_profile_then_prune(llama_dir, corpus_file, tmp_path, capsys, method, extra):
    out = tmp_path / "sens"
    assert main(["sensitivity", "--method", method, "--out", str(out), *_common(llama_dir, corpus_file), *extra]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["method"] == method and len(data["values"]) == 4
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    if method == "shapley":
        assert data["evaluations"] == 16  # exact: 2**4 coalitions

    profile_path = tmp_path / "p.json"
    assert main(["profile", "--family", method, "--sparsity", "0.6", "--sensitivity", str(out / "sensitivity.json"),
                 "--out", str(profile_path)]) == 0
    profile = json.loads(profile_path.read_text())
    assert sum(profile["sparsities"]) / 4 == pytest.approx(0.6)

    pruned = tmp_path / "pruned"
    assert main(["prune", "--profile", str(profile_path), "--out", str(pruned), "--eval-windows", "2",
                 *_common(llama_dir, corpus_file)]) == 0
    metrics = json.loads((pruned / "metrics.json").read_text())
    assert metrics["achieved_sparsity"]["per_block"] == pytest.approx(profile["sparsities"], abs=0.01)


def test_atp_profile_from_block_count(tmp_path):
    out = tmp_path / "atp.json"
    assert main(["profile", "--family", "atp", "--sparsity", "0.7", "--beta", "0.01", "--num-blocks", "30",
                 "--out", str(out)]) == 0
    sparsities = json.loads(out.read_text())["sparsities"]
    assert len(sparsities) == 30 and sum(sparsities) / 30 == pytest.approx(0.7)
    assert sparsities == sorted(sparsities) and sparsities[-1] - sparsities[0] == pytest.approx(0.29)


def test_mixed_nm_profile_is_accepted_by_prune(llama_dir, corpus_file, tmp_path):
    out = tmp_path / "nm.json"
    assert main(["profile", "--family", "free", "--sparsity", "0.5", "--values", "0.2,0.4,0.6,0.8",
                 "--nm-m", "4", "--out", str(out)]) == 0
    profile = json.loads(out.read_text())
    assert profile["nm"] == [None if s == 0 else f"{round(s * 4)}:4" for s in profile["sparsities"]]
    assert main(["prune", "--pruner", "sparsegpt", "--profile", str(out), "--out", str(tmp_path / "o"),
                 "--eval-windows", "2", *_common(llama_dir, corpus_file)]) == 0


def test_profile_needs_the_right_sensitivity(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"method": "owl", "values": [0.1, 0.2]}))
    assert main(["profile", "--family", "fisher", "--sparsity", "0.5", "--sensitivity", str(path),
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "needs 'fisher'" in capsys.readouterr().err
    assert main(["profile", "--family", "atp", "--sparsity", "0.5", "--beta", "0.9", "--num-blocks", "4",
                 "--out", str(tmp_path / "p.json")]) == 2


def test_choices_come_from_the_registries(monkeypatch):
    from orchestrator import cli
    from orchestrator.search import registry
    from pruning import pruners
    from search_spaces import families

    monkeypatch.setitem(registry.DRIVERS, "planted", registry.Driver("planted:run", "a test driver", 0.5))
    monkeypatch.setitem(pruners.PRUNERS, "planted-pruner", pruners.PRUNERS["wanda"])
    monkeypatch.setitem(families.FAMILIES, "planted-family", families.FAMILIES["uniform"])
    parser = cli.build_parser()
    search = parser.parse_args(["search", "--method", "planted", "--pruner", "planted-pruner", "--out", "x"])
    assert (search.method, search.pruner) == ("planted", "planted-pruner")
    profile = parser.parse_args(["profile", "--family", "planted-family", "--sparsity", "0.5", "--out", "p.json"])
    assert profile.family == "planted-family"
    assert list(registry.driver_plan("all")) == ["shapley", "evolution", "tune-free", "tune-atp", "planted"]
