"""Benchmark: which fitness ranks profiles like the real final pass, per unit of cost (issue #10 item 1).

On the default model at one target with the Wanda final pass: an incumbent profile (the sweep's pick
at that target when ``bench/results/sweep-default/table.parquet`` has one, else ATP at half its
maximum slope), ``--neighbours`` random mean-preserving neighbours of it, and the finalist-like
profiles uniform, ATP and the incumbent. For each profile:

- the truth: validation perplexity after the real sequential Wanda pass on all calibration windows
  (held-out validation windows, as the search's finalists are judged);
- KL on the fitness tokens with rank tables from dense activations (today's evaluator);
- KL with rank tables refreshed from the incumbent's sequential activations (``refresh_ranks``);
- a low-fidelity real pass: the sequential Wanda pass on ``--lowfi-windows`` calibration windows,
  then KL to the dense model on the fitness tokens;
- two ceilings, from the truth's own pruned model: its KL and its perplexity on the fitness tokens. A
  proxy whose masks were exactly the final pass's would rank no better than these on those tokens, so
  they tell the fitness tokens' noise apart from the masks' error. Their seconds include the truth's
  whole pass and its validation perplexity.

Spearman of each proxy against the truth and seconds per profile (plus the refresh's one-off cost),
measured in one process. Writes bench/results/fidelity-<tag>.{md,json}.

    python -m bench.fidelity [--sparsity 0.7 --neighbours 20 --lowfi-windows 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.profiles import spearman
from core.profile import Profile
from pruning.data import consecutive_windows, prepare_tokens
from pruning.load import block_param_counts, load_model, pick_device
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.evaluator import CandidateEvaluator
from scoring.perplexity import perplexity
from search_spaces import families
from search_spaces.algebra import project

RESULTS = Path(__file__).parent / "results"
SWEEP_TABLE = RESULTS / "sweep-default" / "table.parquet"


def incumbent_profile(target: float, num_blocks: int) -> tuple[Profile, str]:
    """The sweep's pick at ``target`` (Wanda), else ATP at half its largest slope."""
    if SWEEP_TABLE.exists():
        import pyarrow.parquet as pq

        rows = [r for r in pq.read_table(SWEEP_TABLE).to_pylist()
                if r["chosen"] and r["pruner"] == "wanda" and r["method"] == "all" and abs(r["sparsity"] - target) < 1e-9]
        if rows:
            return Profile(tuple(json.loads(rows[0]["profile"]))), f"sweep-default pick ({rows[0]['candidate']})"
    return families.atp(num_blocks, target, families.atp_beta_max(num_blocks, target) / 2), "ATP, half slope"


def neighbours(incumbent: Profile, count: int, sigma: float, weights: list[int], seed: int) -> list[Profile]:
    """Random neighbours: Gaussian steps of ``sigma`` per block, projected back onto the mean."""
    rng = np.random.default_rng(seed)
    target = incumbent.mean(weights)
    base = np.asarray(incumbent.sparsities)
    return [Profile(tuple(project((base + rng.normal(0, sigma, base.size)).tolist(), target, weights)))
            for _ in range(count)]


@torch.no_grad()
def mean_kl(model, reference_logprobs: torch.Tensor, windows: torch.Tensor, device, batch_size: int) -> float:
    """Mean KL(dense ‖ model) per predicted token on ``windows``."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        logprobs = F.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)
        reference = reference_logprobs[start:start + batch_size]
        total += float((reference.exp() * (reference - logprobs)).sum())
        count += logprobs.shape[0] * logprobs.shape[1]
    return total / count


def run(args) -> dict:
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, torch.float32)
    model.to(device).eval()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fitness_tokens = args.fitness_windows * args.fitness_seqlen
    data = prepare_tokens(tokenizer, args.data, seqlen=args.seqlen, calib_samples=args.calib_samples,
                          eval_windows=args.eval_windows, seed=args.seed,
                          validation_windows=-(-fitness_tokens // args.seqlen) + args.selection_windows)
    fitness = consecutive_windows(data.validation.flatten(), args.fitness_seqlen, args.fitness_windows)
    selection = data.validation[-(-fitness_tokens // args.seqlen):][:args.selection_windows]
    weights = block_param_counts(model)
    blocks = len(weights)
    incumbent, source = incumbent_profile(args.sparsity, blocks)
    beta_max = families.atp_beta_max(blocks, args.sparsity)
    finalists = {"incumbent": incumbent, "uniform": families.uniform(blocks, args.sparsity),
                 "atp-half": families.atp(blocks, args.sparsity, beta_max / 2),
                 "atp-max": families.atp(blocks, args.sparsity, beta_max)}
    profiles = {**finalists, **{f"neighbour-{i}": p for i, p in
                                enumerate(neighbours(incumbent, args.neighbours, args.sigma, weights, args.seed))}}

    with torch.no_grad():
        reference = torch.cat([F.log_softmax(model(fitness[i:i + args.batch_size].to(device)).logits[:, :-1].float(),
                                             dim=-1) for i in range(0, fitness.shape[0], args.batch_size)])
    start = time.perf_counter()
    evaluator = CandidateEvaluator(model, data.calibration, fitness, device, batch_size=args.batch_size,
                                   progress=False)
    build_s = time.perf_counter() - start
    rows: dict[str, dict] = {name: {} for name in profiles}
    start = time.perf_counter()
    for name, kl in zip(profiles, evaluator.fitness_many(list(profiles.values()))):
        rows[name]["kl_dense_tables"] = kl
    dense_tables_s = (time.perf_counter() - start) / len(profiles)
    start = time.perf_counter()
    evaluator.refresh_ranks(data.calibration, incumbent)
    refresh_s = time.perf_counter() - start
    start = time.perf_counter()
    for name, kl in zip(profiles, evaluator.fitness_many(list(profiles.values()))):
        rows[name]["kl_refreshed_tables"] = kl
    refreshed_s = (time.perf_counter() - start) / len(profiles)
    del evaluator

    lowfi_s, truth_s, ceiling_kl_s, ceiling_ppl_s = 0.0, 0.0, 0.0, 0.0
    wanda = get_pruner("wanda")
    for index, (name, profile) in enumerate(profiles.items()):
        model.load_state_dict(dense_state)
        start = time.perf_counter()
        prune_sequentially(model, data.calibration[:args.lowfi_windows], profile, wanda, device, args.batch_size,
                           progress=False)
        rows[name]["kl_lowfi_pass"] = mean_kl(model, reference, fitness, device, args.batch_size)
        lowfi_s += time.perf_counter() - start
        model.load_state_dict(dense_state)
        start = time.perf_counter()
        prune_sequentially(model, data.calibration, profile, wanda, device, args.batch_size, progress=False)
        rows[name]["validation_perplexity"] = perplexity(model, selection, device, args.batch_size, progress=False)
        truth_s += time.perf_counter() - start
        start = time.perf_counter()
        rows[name]["kl_final_model"] = mean_kl(model, reference, fitness, device, args.batch_size)
        ceiling_kl_s += time.perf_counter() - start
        start = time.perf_counter()
        rows[name]["perplexity_final_model"] = perplexity(model, fitness, device, args.batch_size, progress=False)
        ceiling_ppl_s += time.perf_counter() - start
        print(f"[{index + 1}/{len(profiles)}] {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[name].items()),
              file=sys.stderr, flush=True)

    truth = [rows[n]["validation_perplexity"] for n in profiles]
    proxies = {
        "kl_dense_tables": {"seconds_per_profile": dense_tables_s, "one_off_s": build_s,
                            "what": "KL, rank tables from dense activations (today's evaluator)"},
        "kl_refreshed_tables": {"seconds_per_profile": refreshed_s, "one_off_s": refresh_s,
                                "what": "KL, rank tables refreshed from the incumbent's sequential activations"},
        "kl_lowfi_pass": {"seconds_per_profile": lowfi_s / len(profiles), "one_off_s": 0.0,
                          "what": f"KL after the real sequential pass on {args.lowfi_windows} calibration windows"},
        "kl_final_model": {"seconds_per_profile": (truth_s + ceiling_kl_s) / len(profiles), "one_off_s": 0.0,
                           "what": "ceiling: KL of the final pass's own model (every calibration window)"},
        "perplexity_final_model": {"seconds_per_profile": (truth_s + ceiling_ppl_s) / len(profiles),
                                   "one_off_s": 0.0,
                                   "what": "ceiling: perplexity of the final pass's own model on the fitness tokens"},
    }
    for key, proxy in proxies.items():
        values = [rows[n][key] for n in profiles]
        proxy["spearman_all"] = spearman(values, truth)
        proxy["spearman_neighbours"] = spearman([rows[n][key] for n in profiles if n.startswith("neighbour")],
                                                [rows[n]["validation_perplexity"] for n in profiles
                                                 if n.startswith("neighbour")])
    return {"command": "python -m bench.fidelity " + " ".join(sys.argv[1:]), "sparsity": args.sparsity,
            "incumbent": {"source": source, "profile": list(incumbent.sparsities)}, "device": str(device),
            "dtype": "fp32", "protocol": {**data.protocol, "fitness_tokens": fitness_tokens,
                                          "selection_tokens": int(selection.numel()),
                                          "lowfi_calibration_windows": args.lowfi_windows,
                                          "neighbours": args.neighbours, "sigma": args.sigma},
            "truth": {"what": "validation perplexity after the full sequential Wanda pass",
                      "seconds_per_profile": truth_s / len(profiles)},
            "proxies": proxies, "rows": rows}


def render(report: dict) -> str:
    lines = [f"# Fitness fidelity at {report['sparsity']:.0%} (Wanda final pass)", "",
             f"Made by `{report['command']}` on {report['device']} ({report['dtype']}).", "",
             f"Incumbent: {report['incumbent']['source']}. Profiles: the incumbent, uniform, ATP at half and "
             f"full slope, and {report['protocol']['neighbours']} random neighbours of the incumbent (Gaussian "
             f"steps of σ = {report['protocol']['sigma']} per block, projected back onto the mean). Truth: "
             f"{report['truth']['what']} on {report['protocol']['selection_tokens']} held-out validation tokens "
             f"({report['truth']['seconds_per_profile']:.1f} s per profile). Protocol: "
             f"{report['protocol']['calibration']['samples']} × {report['protocol']['seqlen']} calibration "
             f"tokens, fitness on {report['protocol']['fitness_tokens']} validation tokens.", "",
             "| proxy | Spearman vs truth, all profiles | Spearman, neighbours only | s per profile | one-off s |",
             "|---|---:|---:|---:|---:|"]
    for key, proxy in report["proxies"].items():
        lines.append(f"| {proxy['what']} | {proxy['spearman_all']:.3f} | {proxy['spearman_neighbours']:.3f} | "
                     f"{proxy['seconds_per_profile']:.2f} | {proxy['one_off_s']:.1f} |")
    lines += ["", "| profile | KL, dense tables | KL, refreshed tables | KL, low-fidelity pass | KL, final model | "
                  "fitness ppl, final model | validation ppl |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["rows"].items():
        lines.append(f"| {name} | {row['kl_dense_tables']:.4f} | {row['kl_refreshed_tables']:.4f} | "
                     f"{row['kl_lowfi_pass']:.4f} | {row['kl_final_model']:.4f} | {row['perplexity_final_model']:.2f} | "
                     f"{row['validation_perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--neighbours", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=0.04)
    parser.add_argument("--lowfi-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--fitness-windows", type=int, default=8)
    parser.add_argument("--fitness-seqlen", type=int, default=128)
    parser.add_argument("--selection-windows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    report = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"fidelity-{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"fidelity-{args.tag}.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
