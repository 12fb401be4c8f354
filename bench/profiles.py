"""Benchmark: per-block allocation families at one target sparsity with the Wanda final pass.

On the default model: test perplexity for uniform, OWL (paper defaults M=5, λ=0.08), ATP (β picked
on the *validation* split from a small grid), Shapley map (sliding-window values) and Fisher map
(strength picked by the fast evaluator's KL), the cost of each; sliding-window vs sampled Shapley
(rank correlation with a high-sample reference, evaluations, seconds); and how well the evaluator's
KL ranks the ATP grid against the real sequential final pass (Spearman). Writes
bench/results/profiles.{md,json}.

    python -m bench.profiles [--sparsity 0.7 --calib-samples 32 --seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pruning.data import consecutive_windows, prepare_tokens
from pruning.load import load_model, pick_device, pick_dtype
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.evaluator import CandidateEvaluator
from scoring.fisher import block_fisher_traces
from scoring.perplexity import perplexity
from scoring.sensitivity import shapley_sensitivity
from search_spaces import families
from core.profile import Profile

RESULTS = Path(__file__).parent / "results"


def spearman(a, b) -> float:
    """Spearman rank correlation (no ties expected: continuous values)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


class Bench:
    """Shared state: the model with its dense weights, token windows, evaluator."""

    def __init__(self, args) -> None:
        self.args = args
        self.device = pick_device(args.device)
        self.model, tokenizer = load_model(args.model, pick_dtype("auto", self.device))
        self.model.to(self.device)
        self.dense_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.data = prepare_tokens(tokenizer, args.data, seqlen=args.seqlen, calib_samples=args.calib_samples,
                                   eval_windows=args.eval_windows, seed=args.seed)
        self.blocks = self.model.config.num_hidden_layers
        fitness = consecutive_windows(self.data.validation.flatten(), args.fitness_seqlen, args.fitness_windows)
        start = time.perf_counter()
        self.evaluator = CandidateEvaluator(self.model, self.data.calibration, fitness, self.device,
                                            batch_size=args.batch_size, owl_multipliers=(args.owl_m,))
        self.evaluator_build_s = time.perf_counter() - start

    def ppl(self, split: str) -> float:
        windows = getattr(self.data, split)
        return perplexity(self.model, windows, self.device, self.args.batch_size, desc=f"{split} perplexity")

    def final_pass(self, profile: Profile) -> float:
        """Restore dense weights, run the sequential Wanda pass; returns its wall time."""
        self.model.load_state_dict(self.dense_state)
        start = time.perf_counter()
        prune_sequentially(self.model, self.data.calibration, profile, get_pruner(self.args.pruner), self.device,
                           self.args.batch_size)
        return time.perf_counter() - start


def run(args) -> dict:
    bench = Bench(args)
    target, n = args.sparsity, bench.blocks
    report: dict = {"sparsity": target, "pruner": args.pruner, "device": str(bench.device),
                    "protocol": {**bench.data.protocol, "fitness_windows": args.fitness_windows,
                                 "fitness_seqlen": args.fitness_seqlen, "fitness_split": "validation (prefix)"},
                    "evaluator_build_s": bench.evaluator_build_s}
    report["dense"] = {"validation_ppl": bench.ppl("validation"), "test_ppl": bench.ppl("test")}

    # Sensitivities and their cost.
    start = time.perf_counter()
    ratios = bench.evaluator.outlier_ratios(args.owl_m)  # counted while the rank tables were built
    owl_s = time.perf_counter() - start
    start = time.perf_counter()
    fisher = block_fisher_traces(bench.model, bench.data.calibration[: args.fisher_samples], bench.device)
    fisher_s = time.perf_counter() - start
    sliding = shapley_sensitivity(bench.evaluator, target, "sliding", window=args.window)
    per_permutation = n - 1  # distinct prefixes a permutation adds beyond the shared empty and full sets
    matched = max(2, 2 * round(sliding.evaluations / per_permutation / 2))
    sampled = shapley_sensitivity(bench.evaluator, target, "permutation", permutations=matched, seed=1)
    reference = shapley_sensitivity(bench.evaluator, target, "permutation", permutations=args.reference_permutations,
                                    seed=2)
    report["shapley"] = {
        "sliding": {"evaluations": sliding.evaluations, "seconds": sliding.seconds, "window": args.window,
                    "spearman_vs_reference": spearman(sliding.values, reference.values), "values": sliding.values},
        "sampled_matched_cost": {"evaluations": sampled.evaluations, "seconds": sampled.seconds,
                                 "permutations": matched,
                                 "spearman_vs_reference": spearman(sampled.values, reference.values),
                                 "values": sampled.values},
        "reference": {"evaluations": reference.evaluations, "seconds": reference.seconds,
                      "permutations": args.reference_permutations, "values": reference.values,
                      "stderr": reference.stderr},
    }
    report["owl_ratios"], report["fisher_traces"] = ratios, fisher

    rows = []

    def add(name: str, profile: Profile, params: dict, cost: dict, selected_on: str) -> dict:
        pass_s = bench.final_pass(profile)
        row = {"profile": name, "params": params, "validation_ppl": bench.ppl("validation"),
               "test_ppl": bench.ppl("test"), "proxy_kl": bench.evaluator.fitness(profile), "pass_s": pass_s,
               "selection": selected_on, "cost": cost, "sparsities": list(profile.sparsities)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sparsities"}), flush=True)
        return row

    uniform = add("uniform", families.uniform(n, target), {}, {}, "-")
    add("OWL", families.owl(ratios, target, args.owl_lambda), {"M": args.owl_m, "lambda": args.owl_lambda},
        {"seconds": owl_s}, "paper defaults")
    beta_max = families.atp_beta_max(n, target)
    atp_rows = [add(f"ATP grid β={f:.2f}·βmax", families.atp(n, target, f * beta_max), {"beta": f * beta_max},
                    {}, "grid point") for f in args.atp_grid]
    best_atp = min(atp_rows, key=lambda r: r["validation_ppl"])
    report["atp_best"] = {"beta": best_atp["params"]["beta"], "test_ppl": best_atp["test_ppl"],
                          "validation_ppl": best_atp["validation_ppl"],
                          "cost_final_passes": len(atp_rows)}
    report["proxy_vs_final_pass_spearman"] = {
        "atp_grid_kl_vs_validation_ppl": spearman([r["proxy_kl"] for r in atp_rows],
                                                  [r["validation_ppl"] for r in atp_rows]),
        "all_profiles_kl_vs_validation_ppl": None,  # filled in below, once every profile has run
    }

    def best_strength(values) -> tuple[float, dict]:
        scored = {s: bench.evaluator.fitness(families.sensitivity_map(values, target, s)) for s in args.strengths}
        return min(scored, key=scored.get), scored

    strength, scored = best_strength(sliding.values)
    add("Shapley map", families.sensitivity_map(sliding.values, target, strength),
        {"strength": strength, "proxy_kl_by_strength": scored},
        {"evaluations": sliding.evaluations + len(scored), "seconds": sliding.seconds}, "evaluator KL")
    strength, scored = best_strength(fisher)
    add("Fisher map", families.sensitivity_map(fisher, target, strength),
        {"strength": strength, "proxy_kl_by_strength": scored},
        {"seconds": fisher_s, "evaluations": len(scored)}, "evaluator KL")

    report["proxy_vs_final_pass_spearman"]["all_profiles_kl_vs_validation_ppl"] = spearman(
        [r["proxy_kl"] for r in rows], [r["validation_ppl"] for r in rows])
    report["rows"] = rows
    candidates = [r for r in rows if not r["profile"].startswith("ATP grid")]
    best = min(candidates + [best_atp], key=lambda r: r["validation_ppl"])
    report["best"] = {"profile": best["profile"], "test_ppl": best["test_ppl"],
                      "cut_vs_uniform": 1 - best["test_ppl"] / uniform["test_ppl"]}
    return report


def write(report: dict, tag: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "profiles" + (f"-{tag}" if tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    uniform = next(r for r in report["rows"] if r["profile"] == "uniform")["test_ppl"]
    p = report["protocol"]
    lines = [
        f"# Allocation families at {report['sparsity']:.0%} ({report['pruner']} final pass, {report['device']})",
        "",
        f"Protocol: {p['calibration']['samples']} calibration windows x {p['seqlen']} tokens; validation and test: "
        f"{p['test']['windows']} consecutive windows x {p['seqlen']} of their splits; fitness (evaluator KL): "
        f"{p['fitness_windows']} x {p['fitness_seqlen']} tokens of validation; seed {p['seed']}.",
        f"Dense: validation {report['dense']['validation_ppl']:.2f}, test {report['dense']['test_ppl']:.2f}.",
        "",
        "| profile | chosen by | parameters | validation ppl | test ppl | vs uniform | evaluator KL | pass s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        params = ", ".join(f"{k}={v:.4g}" for k, v in r["params"].items() if isinstance(v, (int, float)))
        lines.append(f"| {r['profile']} | {r['selection']} | {params} | {r['validation_ppl']:.2f} | "
                     f"{r['test_ppl']:.2f} | {r['test_ppl'] / uniform - 1:+.1%} | {r['proxy_kl']:.3f} | "
                     f"{r['pass_s']:.0f} |")
    atp = report["atp_best"]
    s = report["shapley"]
    lines += [
        "",
        f"ATP chosen on validation: β = {atp['beta']:.5f} (test ppl {atp['test_ppl']:.2f}, "
        f"{atp['cost_final_passes']} final passes).",
        f"Best profile (chosen on validation): **{report['best']['profile']}**, test ppl "
        f"{report['best']['test_ppl']:.2f}, **{report['best']['cut_vs_uniform']:.1%} below uniform** "
        f"({uniform:.2f}).",
        "",
        "Evaluator proxy vs the real sequential final pass (Spearman of KL against validation perplexity): "
        f"ATP grid {report['proxy_vs_final_pass_spearman']['atp_grid_kl_vs_validation_ppl']:.2f}, "
        f"all profiles {report['proxy_vs_final_pass_spearman']['all_profiles_kl_vs_validation_ppl']:.2f}.",
        "",
        "| Shapley estimator | evaluations | seconds | Spearman vs reference |",
        "|---|---|---|---|",
        f"| sliding window (w={s['sliding']['window']}) | {s['sliding']['evaluations']} | "
        f"{s['sliding']['seconds']:.0f} | {s['sliding']['spearman_vs_reference']:.2f} |",
        f"| permutation sampling, same cost ({s['sampled_matched_cost']['permutations']} orders) | "
        f"{s['sampled_matched_cost']['evaluations']} | {s['sampled_matched_cost']['seconds']:.0f} | "
        f"{s['sampled_matched_cost']['spearman_vs_reference']:.2f} |",
        f"| reference: permutation sampling ({s['reference']['permutations']} orders) | "
        f"{s['reference']['evaluations']} | {s['reference']['seconds']:.0f} | 1 |",
        "",
        f"Evaluator build (score tables, dense reference, cached block inputs): {report['evaluator_build_s']:.0f} s.",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default="default")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--pruner", default="wanda")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32, help="validation and test windows")
    parser.add_argument("--fitness-windows", type=int, default=8)
    parser.add_argument("--fitness-seqlen", type=int, default=128)
    parser.add_argument("--fisher-samples", type=int, default=16)
    parser.add_argument("--window", type=int, default=3, help="sliding-window Shapley window")
    parser.add_argument("--reference-permutations", type=int, default=16)
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--atp-grid", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="ATP β as fractions of its maximum")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    write(run(args), args.tag)


if __name__ == "__main__":
    main()
