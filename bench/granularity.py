"""Benchmark (issue #24): which granularity should the search allocate over: blocks, attention/MLP groups or
single linears?

Reads the seed files ``bench.search`` wrote for each granularity (``search-<tag>-seed<N>.json``, one tag per
granularity, same protocol and token budget) and writes ``bench/results/granularity.md`` (the winner's test
perplexity ÷ the ATP pick and ÷ uniform, per granularity and seed) and ``granularity.svg`` (the same ratios as
bars). The runs themselves:

    python -m bench.search --seeds 0 --budget-tokens 800000 --tag 70-tokens                      # block
    python -m bench.search --seeds 0 --budget-tokens 800000 --granularity group --tag 70-group
    python -m bench.search --seeds 0 --budget-tokens 800000 --granularity linear --tag 70-linear
    python -m bench.granularity
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.tables import differing_fields

RESULTS = Path(__file__).parent / "results"
TAGS = {"block": "70-tokens", "group": "70-group", "linear": "70-linear"}


def _records(tags: dict[str, str]) -> list[tuple[str, dict]]:
    out = []
    for granularity, tag in tags.items():
        for path in sorted(RESULTS.glob(f"search-{tag}-seed*.json")):
            out.append((granularity, json.loads(path.read_text())))
    return out


def _ratios(record: dict) -> tuple[float, float]:
    winner = record["winner_test_perplexity"]
    return winner / record["atp_pick_test_perplexity"], winner / record["baselines"]["uniform"]["test_perplexity"]


def _protocol_differences(records: list[tuple[str, dict]]) -> str:
    """The protocol fields whose values differ between the rows of one seed, each value with its rows."""
    parts = []
    for seed in sorted({r["seed"] for _, r in records}):
        rows = [(granularity, r["protocol"]) for granularity, r in records if r["seed"] == seed]
        parts += [f"seed {seed} {key}: " + ", ".join(f"{v} ({', '.join(g)})" for v, g in values.items())
                  for key, values in differing_fields(rows, skip=("granularity",))]
    return "Protocol fields that differ within a seed: " + ("; ".join(parts) if parts else "none") + "."


def write_table(records: list[tuple[str, dict]]) -> Path:
    lines = ["# Granularity: blocks, attention/MLP groups or single linears", "",
             "The winner of `search --method all` (default model, 70 %, Wanda pass, same token budget) at each "
             "`--granularity`: its test perplexity ÷ the ATP pick's and ÷ uniform's (below 1 beats them). Each row's "
             "command is in its file. Within a seed, compare the winners' test perplexities: each run searches its "
             "own ATP pick (Tune's ATP driver beside the β grid), so ÷ ATP pick moves with that pick too.", "",
             "| granularity | seed | winner | winner test ppl | ATP pick test ppl | ÷ ATP pick | ÷ uniform | "
             "pick margin (nats ± se) | file |", "|---|---|---|---|---|---|---|---|---|"]
    for granularity, r in records:
        to_atp, to_uniform = _ratios(r)
        margin = r.get("selection_margin") or {}
        pick = f"{margin['nll_gap']:.4f} ± {margin['nll_gap_se']:.4f} vs {margin['runner_up']}" if margin else "-"
        lines.append(f"| {granularity} | {r['seed']} | {r['winner']} | {r['winner_test_perplexity']:.2f} | "
                     f"{r['atp_pick_test_perplexity']:.2f} | **{to_atp:.3f}** | {to_uniform:.3f} | {pick} | "
                     f"`search-{TAGS[granularity]}-seed{r['seed']}.json` |")
    lines += ["", _protocol_differences(records),
              "", "Commands: " + "; ".join(sorted({f"`{r['command']}`" for _, r in records})) + "."]
    path = RESULTS / "granularity.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_figure(records: list[tuple[str, dict]]) -> Path:
    """Bars: winner ÷ ATP pick and ÷ uniform per (granularity, seed)."""
    width, height, left, bottom, bar = 560, 300, 60, 50, 22
    top = max(max(_ratios(r)) for _, r in records) * 1.1 if records else 1.0
    scale = (height - bottom - 20) / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{height - bottom - scale}" x2="{width - 10}" y2="{height - bottom - scale}" '
             'stroke="grey" stroke-dasharray="4"/>',
             f'<text x="{left - 5}" y="{height - bottom - scale + 4}" text-anchor="end">1.0</text>']
    for index, (granularity, r) in enumerate(records):
        x = left + 15 + index * (2 * bar + 30)
        for offset, (value, colour) in enumerate(zip(_ratios(r), ("#1f77b4", "#ff7f0e"))):
            h = value * scale
            parts.append(f'<rect x="{x + offset * bar}" y="{height - bottom - h:.1f}" width="{bar - 2}" '
                         f'height="{h:.1f}" fill="{colour}"/>')
            parts.append(f'<text x="{x + offset * bar + bar / 2 - 1}" y="{height - bottom - h - 3:.1f}" '
                         f'text-anchor="middle">{value:.2f}</text>')
        parts.append(f'<text x="{x + bar}" y="{height - bottom + 15}" text-anchor="middle">{granularity}</text>')
        parts.append(f'<text x="{x + bar}" y="{height - bottom + 28}" text-anchor="middle">seed {r["seed"]}</text>')
    parts += [f'<rect x="{width - 190}" y="10" width="10" height="10" fill="#1f77b4"/>',
              f'<text x="{width - 175}" y="19">winner ÷ ATP pick</text>',
              f'<rect x="{width - 190}" y="26" width="10" height="10" fill="#ff7f0e"/>',
              f'<text x="{width - 175}" y="35">winner ÷ uniform</text>', "</svg>"]
    path = RESULTS / "granularity.svg"
    path.write_text("\n".join(parts) + "\n")
    return path


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    records = _records(TAGS)
    print(write_table(records))
    print(write_figure(records))


if __name__ == "__main__":
    main()
