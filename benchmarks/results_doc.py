"""Tables and charts of the small-scale reproduction, from its run folders (one per replay mode).

    python benchmarks/results_doc.py RUN_DIR... [--out docs] [--prefix results] [--fragment docs/results_tables.md]

writes
  OUT/PREFIX_bleu_by_mode.png      best generation of each mode beside the base model (BLEU-4), with the
                                   paper's figures in a panel of their own (another model, so another scale)
  OUT/PREFIX_generations.png       BLEU-4 and ROUGE-L across generations, one line per mode
  FRAGMENT                         the markdown tables: BLEU-4 per generation and mode; every metric per
                                   mode; seconds per generation and per stage; how long the answers are
                                   (the eval answers, the answers each generation wrote and trained on,
                                   beside the references); greedy vs. sampled decoding where
                                   `reproduce_visit.sh sampled` made it; what 100 eval pairs can tell
                                   apart: every generation against the base model and generation 0,
                                   and the runs against each other, with paired bootstrap intervals
Each run's mode is read from its config.json (replay.mode and replay.k), not from its name.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfevo.data import read_json, read_jsonl, write_bytes, write_text  # noqa: E402
from selfevo.report import METRICS, collect  # noqa: E402

# arXiv 2408.12247, Qwen1.5-7B-Chat on the AIOps eval set, BLEU-4 (the issue quotes them).
PAPER = {
    "base": 7.27, "Qwen-72B": 13.90, "GPT-3.5": 14.48, "7B + high-quality data": 17.85,
    "self-evolution (hard), best": 19.9, "no replay, best": 17.7, "random replay, best": 18.5, "all replay, best": 19.3,
}
STAGES = ("questions", "answers", "replay", "train", "score", "evaluate")
ORDER = ("hard", "none", "random", "all", "easy", "even")


def mode_of(config: dict) -> str:
    """The replay mode of a run's config ("none": replay of k = 0 pairs)."""
    replay = config["replay"]
    if replay["mode"] != "all" and replay["k"] == 0:
        return "none"
    return replay["mode"]


def label_of(run: dict) -> str:
    k = run["k"]
    return {"none": "no replay", "all": "all"}.get(run["mode"], f"{run['mode']} (k={k})") + run["answers_note"]


def load_runs(run_dirs: list[Path]) -> list[dict]:
    runs = []
    for d in run_dirs:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))["config"]
        rows = collect(d)
        if not rows:
            raise SystemExit(f"results_doc: {d}: no evaluated model yet")
        sampled = {}
        for m in sorted((d / "sampled").glob("*/*/metrics.json")):
            sampled.setdefault(m.parent.parent.name, {})[m.parent.name] = json.loads(m.read_text())
        runs.append({
            "dir": d, "name": d.name, "mode": mode_of(config), "k": config["replay"]["k"], "rows": rows,
            "forked": (d / "FORKED_FROM").read_text().split(":")[0] if (d / "FORKED_FROM").exists() else None,
            "sampled": sampled,
            # generation.answer_model (left out of config.json at its default, current)
            "answer_model": config.get("generation", {}).get("answer_model", "current"),
        })
    # Where the runs differ in who answered, the paper's way (current) is named in their labels.
    mixed = len({r["answer_model"] for r in runs}) > 1
    for r in runs:
        r["answers_note"] = ", answers by M_i" if mixed and r["answer_model"] == "current" else ""
    return sorted(runs, key=lambda r: (ORDER.index(r["mode"]) if r["mode"] in ORDER else 99, r["name"]))


def gens(run: dict) -> list[dict]:
    return [r for r in run["rows"] if r["model"] != "base"]


def base_row(run: dict) -> dict | None:
    return next((r for r in run["rows"] if r["model"] == "base"), None)


def best(run: dict) -> dict | None:
    g = gens(run)
    return max(g, key=lambda r: r["bleu-4"]) if g else None


def gen_seconds(row: dict) -> float | None:
    values = [v for k, v in (row.get("seconds") or {}).items() if k in STAGES and v is not None]
    return sum(values) if values else None


def fmt(x, digits=2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def bleu_matrix(runs: list[dict]) -> str:
    models = []
    for run in runs:
        for r in run["rows"]:
            if r["model"] not in models:
                models.append(r["model"])
    models.sort(key=lambda m: -1 if m == "base" else int(m.split("_")[1]))
    lines = ["| model | " + " | ".join(label_of(r) for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for m in models:
        cells = []
        for run in runs:
            row = next((r for r in run["rows"] if r["model"] == m), None)
            cells.append(fmt(row["bleu-4"]) if row else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    b = [(run, best(run), base_row(run)) for run in runs]
    lines.append("| **best generation** | " + " | ".join(
        f"**{fmt(bb['bleu-4'])}** ({bb['model']}, {100 * (bb['bleu-4'] / base['bleu-4'] - 1):+.0f}% over base)"
        if bb and base and base["bleu-4"] else "" for _, bb, base in b) + " |")
    return "\n".join(lines) + "\n"


def run_table(run: dict) -> str:
    lines = ["| model | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | QA pairs | replayed | seconds |", "|---" * 8 + "|"]
    for r in run["rows"]:
        shared = " (shared)" if run["forked"] and r["model"] in ("base", "gen_0") else ""
        secs = gen_seconds(r) if r["model"] != "base" else (r.get("seconds") or {}).get("evaluate")
        lines.append("| " + " | ".join([
            r["model"] + shared, *(fmt(r[m]) for m in METRICS), str(r.get("qa_pairs") or ""),
            "" if r.get("replayed") is None else str(r["replayed"]), fmt(secs, 0),
        ]) + " |")
    return "\n".join(lines) + "\n"


def seconds_table(runs: list[dict]) -> str:
    lines = ["| run | generation | " + " | ".join(STAGES) + " | total |", "|---" * (len(STAGES) + 3) + "|"]
    for run in runs:
        for r in gens(run):
            if run["forked"] and r["model"] == "gen_0":
                continue  # the same folder as the run it was forked from
            s = r.get("seconds") or {}
            lines.append(f"| {run['name']} | {r['model']} | " + " | ".join(fmt(s.get(k), 0) for k in STAGES)
                         + f" | {fmt(gen_seconds(r), 0)} |")
    return "\n".join(lines) + "\n"


def records(path: Path) -> list[dict]:
    """A JSONL file's records; none without the file. Several tables use each file: it is read once
    while it stays the same (path, size and modification time)."""
    if not path.is_file():
        return []
    st = path.stat()
    return _read_jsonl(path, st.st_size, st.st_mtime_ns)


@functools.cache
def _read_jsonl(path: Path, size: int, mtime_ns: int) -> list[dict]:
    return read_jsonl(path)


def median_of(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def echoes_question(question: str, answer: str, n: int = 4) -> bool:
    """An answer that says little beyond its question: 80% or more of its n-character windows occur in
    the question (whitespace and punctuation aside), e.g. "填写申请单。" for "如何填写申请单？"."""
    q, a = re.sub(r"[\W_]+", "", question), re.sub(r"[\W_]+", "", answer)
    if not a:
        return False  # nothing written: not an echo (the clean-up counts it as looping)
    if len(a) < n:
        return a in q
    windows = [a[i : i + n] for i in range(len(a) - n + 1)]
    return sum(w in q for w in windows) >= 0.8 * len(windows)


def lengths_table(runs: list[dict], references: float | None) -> str:
    """How long the answers are, in characters (median): what each model answers to the eval questions,
    and what each generation wrote (open book) and trained on; beside them, the signs of a collapsing
    loop: how many answers the clean-up dropped and why, and how often the commonest answer was given
    (before the clean-up, which drops a reply given three times or more, where stages.json counts it)."""
    head = f"eval answers (references: {fmt(references, 0)})"
    lines = [f"| run | model | {head} | answers written and trained on | answers dropped (looping / restating / repeated) "
             "| commonest answer, times given | median IFD | answers echoing their question (eval / written) |",
             "|---" * 8 + "|"]
    def echoes(items: list[dict], key: str) -> str:
        if not items or "question" not in items[0]:
            return ""
        return f"{sum(echoes_question(p['question'], p[key]) for p in items)} of {len(items)}"

    for run in runs:
        for r in run["rows"]:
            if run["forked"] and r["model"] in ("base", "gen_0"):
                continue  # the same folders as the run it was forked from
            folder = run["dir"] / r["model"]
            predictions, pairs = records(folder / "predictions.jsonl"), records(folder / "qa.jsonl")
            answers = read_json(folder / "stages.json").get("answers", {}) if (folder / "stages.json").is_file() else {}
            dropped = answers.get("dropped", "")
            if "repeated" in answers:  # written since the clean-up counts its reasons
                dropped = f"{dropped} ({answers['looping']} / {answers['restating']} / {answers['repeated']})"
            # the commonest reply before the clean-up where it was counted; else what was kept
            commonest = answers.get("commonest_given", max(Counter(p["answer"] for p in pairs).values(), default=""))
            lines.append(f"| {run['name']} | {r['model']} | {fmt(median_of([len(p['prediction']) for p in predictions]), 0)} | "
                         f"{fmt(median_of([len(p['answer']) for p in pairs]), 0)} | {dropped} | "
                         f"{commonest} | {fmt(median_of([p['ifd'] for p in pairs]), 3)} | {echoes(predictions, 'prediction')}"
                         f"{' / ' + echoes(pairs, 'answer') if pairs else ''} |")
    return "\n".join(lines) + "\n"


def paired_interval(a: list[float], b: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of a - b over the same eval pairs, and its 95% percentile-bootstrap interval (the pairs
    resampled with replacement, `draws` times, seeded: the same scores give the same interval)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_interval: needs the same, non-zero number of scores ({len(a)} and {len(b)})")
    differences = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(differences, k=len(differences))) for _ in range(draws))
    return statistics.fmean(differences), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def pair_scores(run: dict, model: str) -> list[float] | None:
    """The per-pair BLEU-4 of a model's eval answers, in eval-set order (None if not recorded)."""
    predictions = records(run["dir"] / model / "predictions.jsonl")
    return [p["bleu-4"] for p in predictions] if predictions and all("bleu-4" in p for p in predictions) else None


def interval_cell(a: list[float] | None, b: list[float] | None) -> str:
    if a is None or b is None:
        return ""
    mean, low, high = paired_interval(a, b)
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def gains_table(runs: list[dict]) -> str:
    """Every generation of each run against the base model and generation 0: the BLEU-4 difference
    over the same eval pairs with its 95% interval. A gap whose interval holds 0 is one that this
    eval set cannot tell from the spread of its pairs."""
    lines = []
    for run in runs:
        base, gen_0 = pair_scores(run, "base"), pair_scores(run, "gen_0")
        for r in gens(run):
            if run["forked"] and r["model"] == "gen_0":
                continue  # shared with the run it was forked from, and shown there
            here = pair_scores(run, r["model"])
            over_gen_0 = interval_cell(here, gen_0) if r["model"] != "gen_0" else ""
            lines.append(f"| {run['name']} | {r['model']} | {interval_cell(here, base)} | {over_gen_0} |")
    head = "| run | model | BLEU-4 gain over the base model [95% interval] | over gen_0 [95% interval] |\n"
    return head + "|---" * 4 + "|\n" + "\n".join(lines) + "\n"


def runs_table(runs: list[dict]) -> str:
    """Each pair of runs at their last generation: the BLEU-4 difference over the same eval pairs with
    its 95% interval (the replay modes' comparison)."""
    lines = []
    for k, a in enumerate(runs):
        for b in runs[k + 1 :]:
            if gens(a) and gens(b):
                ga, gb = gens(a)[-1]["model"], gens(b)[-1]["model"]
                cell = interval_cell(pair_scores(a, ga), pair_scores(b, gb))
                lines.append(f"| {a['name']} {ga} | {b['name']} {gb} | {cell} |")
    head = "| run | minus run | BLEU-4 difference [95% interval] |\n"
    return head + "|---" * 3 + "|\n" + "\n".join(lines) + "\n"


def sampled_table(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        for model, ways in run["sampled"].items():
            for way in ("greedy", "sample"):
                if way in ways:
                    decoding = "greedy" if way == "greedy" else "sampled (T 0.95, top-p 0.7, top-k 50)"
                    lines.append(f"| {run['name']} | {model} | {decoding} | " + " | ".join(fmt(ways[way][m]) for m in METRICS) + " |")
    if not lines:
        return ""
    return "| run | model | decoding (HF generate) | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L |\n" + "|---" * 7 + "|\n" + "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    write_bytes(path, image.getvalue())


def bar_chart(runs: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    base = base_row(runs[0])
    names = ["base"] + [label_of(r) for r in runs]
    values = [base["bleu-4"] if base else 0] + [best(r)["bleu-4"] if best(r) else 0 for r in runs]
    bars = ax.bar(range(len(names)), values, color=["grey"] + [f"C{i}" for i in range(len(runs))])
    ax.bar_label(bars, labels=[fmt(values[0])] + [
        f"{v:.2f}\n({best(r)['model']})" if best(r) else "" for v, r in zip(values[1:], runs)], fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("BLEU-4 (x100), greedy")
    ax.set_title("this reproduction: Qwen2.5-Coder-0.5B,\nbest generation of each replay mode", fontsize=9)
    ax.set_ylim(0, max(values) * 1.25 or 1)
    pn, pv = list(PAPER), list(PAPER.values())
    pb = ax_paper.bar(range(len(pn)), pv, color="lightsteelblue")
    ax_paper.bar_label(pb, fmt="%.2f", fontsize=8)
    ax_paper.set_xticks(range(len(pn)), pn, rotation=25, ha="right", fontsize=8)
    ax_paper.set_title("the paper: Qwen1.5-7B-Chat (arXiv 2408.12247), for the trend only", fontsize=9)
    ax_paper.set_ylim(0, max(pv) * 1.2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def line_chart(runs: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("bleu-4", "rouge-l")):
        for i, run in enumerate(runs):
            xs = [0 if r["model"] == "base" else int(r["model"].split("_")[1]) + 1 for r in run["rows"]]
            ax.plot(xs, [r[metric] for r in run["rows"]], marker="o", color=f"C{i}", label=label_of(run))
        ax.set_xlabel("model: 0 = base, i = after generation i-1 (gen_<i-1>)")
        ax.set_ylabel(f"{metric.upper()} (x100), greedy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("closed-book eval on the 100 AIOps eval pairs, across generations", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def fragment(runs: list[dict], bar: Path, line: Path, md_dir: Path) -> str:
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), md_dir.resolve())).as_posix()  # noqa: E731
    parts = [
        f"![BLEU-4, best generation per mode]({rel(bar)})\n",
        f"![BLEU-4 and ROUGE-L across generations]({rel(line)})\n",
        "### BLEU-4 per generation and replay mode (greedy)\n", bleu_matrix(runs),
    ]
    for run in runs:
        note = f" (base and gen_0 shared with {run['forked']}: generation 0 replays nothing in any mode)" if run["forked"] else ""
        parts += [f"### {run['name']}: {label_of(run)}{note}\n", run_table(run)]
    parts += ["### Seconds per generation and stage\n", seconds_table(runs)]
    references = median_of([len(p["reference"]) for p in records(runs[0]["dir"] / "base" / "predictions.jsonl")])
    parts += ["### How long the answers are (median characters)\n", lengths_table(runs, references)]
    parts += [
        "### What the eval set can tell apart (BLEU-4, paired bootstrap over its pairs, 2,000 draws)\n",
        gains_table(runs),
        "The runs against each other at their last generation:\n",
        runs_table(runs),
    ]
    sampled = sampled_table(runs)
    if sampled:
        parts += ["### Greedy and sampled decoding of the same model\n", sampled]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNGs")
    ap.add_argument("--prefix", default="results")
    ap.add_argument("--fragment", type=Path, default=Path("docs/results_tables.md"))
    a = ap.parse_args(argv)
    runs = load_runs(a.runs)
    bar = bar_chart(runs, a.out / f"{a.prefix}_bleu_by_mode.png")
    line = line_chart(runs, a.out / f"{a.prefix}_generations.png")
    write_text(a.fragment, fragment(runs, bar, line, a.fragment.parent))
    print(f"wrote {bar}, {line}, {a.fragment}")


if __name__ == "__main__":
    main()
