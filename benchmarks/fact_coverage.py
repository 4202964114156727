"""Where the eval's facts are lost: never taught, or taught and not recalled.

For each fact of each eval reference (selfevo.facts), two questions about a run's generation N:
- *covered*: does some QA pair of generations 0..N about the same fragment (the eval pair's
  `instruction`, which data.include_eval puts among the fragments) state it in its answer?
- *stated*: does generation N's closed-book answer to the eval question state it?
Facts are pooled over the eval set (fact recall in metrics.json averages per question instead).

    python benchmarks/fact_coverage.py RUN_DIR --eval data/black_docs_eval.json --generation 1

A fact covered but not stated was trained on and not retrieved by the eval's phrasing; a fact not
covered was never taught. docs/results.md has what it found on Black's documentation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selfevo.facts import reference_facts, states


def coverage(run: Path, eval_pairs: list[dict], generation: int, language: str) -> dict:
    """Counts of the eval facts covered by the run's QA up to `generation`, and stated by it."""
    taught: dict[str, list[str]] = {}
    for g in range(generation + 1):
        with open(run / f"gen_{g}" / "qa.jsonl", encoding="utf-8") as f:
            for line in f:
                pair = json.loads(line)
                taught.setdefault(pair["fragment"], []).append(pair["answer"])
    with open(run / f"gen_{generation}" / "predictions.jsonl", encoding="utf-8") as f:
        answer = {(p["fragment"], p["question"]): p["prediction"] for p in map(json.loads, f)}
    counts = dict.fromkeys(("facts", "covered", "covered_stated", "uncovered_stated"), 0)
    pairs_per_fragment = []
    for pair in eval_pairs:
        facts = reference_facts(pair["output"], pair["input"], language)
        if not facts:
            continue
        answers = taught.get(pair["instruction"], [])
        pairs_per_fragment.append(len(answers))
        prediction = answer[(pair["instruction"], pair["input"])]
        for fact in facts:
            covered = any(states(fact, a, language) for a in answers)
            stated = states(fact, prediction, language)
            counts["facts"] += 1
            counts["covered"] += covered
            counts["covered_stated" if covered else "uncovered_stated"] += stated
    pairs_per_fragment.sort()
    counts["median_pairs_per_fragment"] = pairs_per_fragment[len(pairs_per_fragment) // 2]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--eval", required=True, type=Path, help="the eval set (JSON list)")
    parser.add_argument("--generation", type=int, nargs="+", default=[0])
    parser.add_argument("--language", default="en", choices=["en", "zh"])
    args = parser.parse_args()
    eval_pairs = json.loads(args.eval.read_text(encoding="utf-8"))
    print(
        "| run | gen | facts | covered | stated when covered | stated when not "
        "| QA pairs a fragment (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        for g in args.generation:
            c = coverage(run, eval_pairs, g, args.language)
            n, cov = c["facts"], c["covered"]
            print(
                f"| {run.name} | {g} | {n} | {cov} ({cov / n:.0%}) "
                f"| {c['covered_stated']} ({c['covered_stated'] / max(cov, 1):.0%}) "
                f"| {c['uncovered_stated']} ({c['uncovered_stated'] / max(n - cov, 1):.0%}) "
                f"| {c['median_pairs_per_fragment']} |"
            )


if __name__ == "__main__":
    main()
