"""What a run's models know, against the controls that expose a gain of style: tables, chart,
intervals.

Every evaluated model's answers are scored again here from its predictions.jsonl, with this
version's metrics (selfevo.evaluate.score_answers), so old and new generations are measured alike.
Beside the base model's closed-book row stand its open-book answers (the ceiling) and the question
given back as the answer (the echo baseline). For each generation:
  recovered[m]        = (generation - closed-book base) / (open-book base - closed-book base), per
  metric;
                        None where the open-book gap's own 95% interval holds 0;
  length-matched base = the base model's closed-book answers cut to the generation's median length;
  vs_base, vs_length_matched_base = the paired bootstrap 95% interval of the generation's per-pair
                        scores minus theirs. A gain over the length-matched base whose interval
                        holds 0 is not shown to be knowledge;
  vs_previous         = the same interval against the generation before (from gen_1 on): whether
                        the round added.
docs/metrics.md defines each measure.
"""

from __future__ import annotations

import functools
import io
import re
import statistics
from pathlib import Path
from typing import Optional

import numpy as np
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from selfevo.data import DataError, load_eval
from selfevo.evaluate import score_answers
from selfevo.facts import NO, YES, reference_facts, states
from selfevo.prompts import Language
from selfevo.rundir import RunError, read_json, read_jsonl, write_bytes, write_json, write_text

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
"""The seed's metrics, in every run."""
PER_PAIR = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "rouge-l-stem", "fact-recall")
"""The metrics with a score per pair: those that get intervals and `recovered` (SacreBLEU is a
corpus score, with no per-pair value to resample)."""
LABELS = {
    "bleu-4": "BLEU-4",
    "rouge-1": "ROUGE-1",
    "rouge-2": "ROUGE-2",
    "rouge-l": "ROUGE-L",
    "sacrebleu": "SacreBLEU",
    "rouge-l-stem": "ROUGE-L (words, stemmed)",
    "fact-recall": "fact recall",
}
DRAWS = 2000


def paired_interval(
    a: list[float], b: list[float], draws: int = DRAWS, seed: int = 0
) -> list[float]:
    """[mean, low, high]: the mean of a - b over the same eval pairs and its 95%
    percentile-bootstrap interval (the pairs resampled with replacement `draws` times, seeded: the
    same scores give the same interval)."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_interval: needs the same, non-zero number of scores ({len(a)} and {len(b)})"
        )
    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(draws, len(differences)))].mean(
        axis=1
    )
    low, high = np.percentile(means, [2.5, 97.5])
    return [round(float(differences.mean()), 4), round(float(low), 4), round(float(high), 4)]


def answer_length(text: str, language: Language) -> int:
    """Characters for Chinese (whitespace aside), words for English."""
    return len(re.sub(r"\s+", "", text)) if language == "zh" else len(text.split())


def cut_to_length(text: str, length: int, language: Language) -> str:
    """The first `length` units of `text` (characters for Chinese, words for English)."""
    if language == "zh":
        kept, count = [], 0
        for c in text:
            if count >= length:
                break
            kept.append(c)
            count += not c.isspace()
        return "".join(kept)
    return " ".join(text.split()[:length])


def echoes_question(question: str, answer: str, n: int = 4) -> bool:
    """An answer that says little beyond its question: 80% or more of its n-character windows occur
    in the question (whitespace and punctuation aside), e.g. "填写申请单。" for
    "如何填写申请单？"."""
    q, a = re.sub(r"[\W_]+", "", question.lower()), re.sub(r"[\W_]+", "", answer.lower())
    if not a:
        return False  # nothing written: not an echo (the clean-up counts it as looping)
    if len(a) < n:
        return a in q
    windows = [a[i : i + n] for i in range(len(a) - n + 1)]
    return sum(w in q for w in windows) >= 0.8 * len(windows)


def _scores(pairs: list[dict], metric: str) -> Optional[list[float]]:
    """A metric's per-pair scores; fact recall's on the pairs whose reference holds a fact."""
    if not pairs or metric not in pairs[0]:
        return None
    values = [p[metric] for p in pairs]
    return [v for v in values if v is not None] if metric == "fact-recall" else values


class Scored:
    """One set of answers to the eval questions, scored: the means and each pair's scores."""

    def __init__(
        self,
        answers: tuple[str, ...],
        questions: tuple[str, ...],
        references: tuple[str, ...],
        language: Language,
        metrics: str,
    ):
        records = [{"question": q, "reference": r} for q, r in zip(questions, references)]
        self.answers = answers
        self.means, self.pairs = score_answers(list(answers), records, language, metrics)
        self.lengths = [answer_length(a, language) for a in answers]
        self.restating = sum(echoes_question(q, a) for q, a in zip(questions, answers)) / len(
            answers
        )

    def row(self) -> dict:
        return {
            **self.means,
            "answer_length": statistics.median(self.lengths),
            "restating": round(self.restating, 4),
        }

    def minus(self, other: Scored) -> dict[str, list[float]]:
        """Per metric, the paired interval of these scores minus the other's."""
        out = {}
        for m in PER_PAIR:
            mine, theirs = _scores(self.pairs, m), _scores(other.pairs, m)
            if mine and theirs:
                out[m] = paired_interval(mine, theirs)
        return out


@functools.lru_cache(maxsize=64)
def _scored_cached(
    answers: tuple[str, ...],
    questions: tuple[str, ...],
    references: tuple[str, ...],
    language: Language,
    metrics: str,
) -> Scored:
    return Scored(answers, questions, references, language, metrics)


def scored(answers: list[str], records: list[dict], language: Language, metrics: str) -> Scored:
    """The answers scored, once per process: the loop writes the summary after every generation, and
    the answers of the earlier ones have not changed."""
    questions = tuple(r["question"] for r in records)
    references = tuple(r["reference"] for r in records)
    return _scored_cached(tuple(answers), questions, references, language, metrics)


def _eval_records(run_dir: Path, predictions: list[dict], eval_file: Optional[Path]) -> list[dict]:
    """The eval records the predictions answer, in order: in the predictions themselves, or (for run
    files that kept only the answers) from the eval file given or named in the run's config."""
    if all("question" in p and "reference" in p for p in predictions):
        return predictions
    if eval_file is None:
        named = read_json(run_dir / "config.json")["config"]["data"]["eval"]
        if not named:  # the eval generation 0 held out (loop.Loop.hold_out_eval)
            return read_jsonl(run_dir / "gen_0" / "eval.jsonl")[: len(predictions)]
        eval_file = Path(named)
    records = load_eval(eval_file)
    if len(records) < len(predictions):
        raise DataError(
            f"{eval_file}: {len(records)} eval records, fewer than the run's {len(predictions)} "
            "answers"
        )
    return records[: len(predictions)]


def _run_settings(run_dir: Path) -> tuple[Language, str]:
    config = (
        read_json(run_dir / "config.json")["config"] if (run_dir / "config.json").is_file() else {}
    )
    language = config.get("generation", {}).get("language", "en")
    metrics = config.get("evaluation", {}).get("metrics", "auto")
    if metrics == "auto":
        metrics = "seed+word" if language == "en" else "seed"
    return language, metrics


def _predictions(folder: Path) -> Optional[list[dict]]:
    for name in ("predictions.jsonl", "predictions_slim.jsonl"):  # slim: run files that travelled
        if (folder / name).is_file():
            return read_jsonl(folder / name)
    return None


def facts_taught(
    records: list[dict], answers: list[str], taught: dict[str, list[str]], language: Language
) -> Optional[dict]:
    """Where the references' facts are lost. Of the facts of the eval references (pooled over the
    eval set), the share that some QA pair trained on about the eval pair's fragment states
    ("taught"), and the shares of those and of the rest that the model's answer states. A yes or
    no is left out: any trained answer about the fragment that opens with one would "teach" it.
    `taught` is keyed by the stripped fragment. None where the run trained on none of the eval
    pairs' fragments."""
    fragments = [(r.get("fragment") or "").strip() for r in records]
    if not any(f in taught for f in fragments):
        return None
    counts = {"facts": 0, "taught": 0, "stated_taught": 0, "stated_untaught": 0}
    for record, fragment, answer in zip(records, fragments, answers):
        trained = taught.get(fragment, [])
        facts = reference_facts(record["reference"], record["question"], language)
        for fact in (f for f in facts if f not in (YES, NO)):
            was_taught = any(states(fact, a, language) for a in trained)
            counts["facts"] += 1
            counts["taught"] += was_taught
            counts["stated_taught" if was_taught else "stated_untaught"] += states(
                fact, answer, language
            )
    if not counts["facts"]:
        return None
    untaught = counts["facts"] - counts["taught"]
    return {
        "taught": 100 * counts["taught"] / counts["facts"],
        "stated_taught": 100 * counts["stated_taught"] / counts["taught"]
        if counts["taught"]
        else None,
        "stated_untaught": 100 * counts["stated_untaught"] / untaught if untaught else None,
        "facts": counts["facts"],
    }


def collect(run_dir: str | Path, eval_file: Optional[Path] = None) -> list[dict]:
    """One row per evaluated model: the base model (with its open-book answers and the question-echo
    baseline beside it), then each finished generation with its knowledge recovered and controls."""
    run_dir = Path(run_dir)
    language, metrics = _run_settings(run_dir)
    gens = sorted(
        (int(m.group(1)), p)
        for p in run_dir.glob("gen_*")
        if (m := re.fullmatch(r"gen_(\d+)", p.name))
    )
    base: Optional[Scored] = None
    previous: Optional[Scored] = None  # the last generation evaluated before this one
    open_book: Optional[Scored] = None
    gap: dict[str, list[float]] = {}
    base_general: Optional[list[float]] = None
    taught: dict[str, list[str]] = {}  # fragment -> the answers trained on about it so far
    rows = []
    for name, folder in [("base", run_dir / "base")] + [(f"gen_{i}", p) for i, p in gens]:
        trained_here = (folder / "qa.jsonl").is_file()
        if trained_here:  # what was trained on, evaluated or not
            for pair in read_jsonl(folder / "qa.jsonl"):
                if "fragment" in pair and "answer" in pair:
                    taught.setdefault(pair["fragment"].strip(), []).append(pair["answer"])
        predictions = _predictions(folder)
        if predictions is None or not (folder / "metrics.json").exists():
            continue
        records = _eval_records(run_dir, predictions, eval_file)
        answers = scored([p["prediction"] for p in predictions], records, language, metrics)
        stages = read_json(folder / "stages.json") if (folder / "stages.json").exists() else {}
        row = {"model": name, **answers.row()}
        row["seconds"] = {k: v.get("seconds") for k, v in stages.items()}
        if name == "base":
            base = answers
            open_predictions = _predictions(folder / "open_book")
            if open_predictions is not None:
                open_book = scored(
                    [p["prediction"] for p in open_predictions], records, language, metrics
                )
                row["open_book"] = open_book.row()
                gap = open_book.minus(base)
                row["open_book_gap"] = gap
            echo = scored([r["question"] for r in records], records, language, metrics)
            row["question_echo"] = echo.row()
            if (run_dir / "gen_0" / "eval.jsonl").is_file() and eval_file is None:
                row["held_out_eval"] = len(records)
        else:
            row["qa_pairs"] = stages.get("answers", {}).get("kept")
            row["replayed"] = stages.get("replay", {}).get("chosen")
            check = stages.get("check", {})
            row["dev_fact_recall"] = check.get("dev_fact_recall")
            row["trained_fact_recall"] = check.get("trained_fact_recall")
            if trained_here:
                row["facts_taught"] = facts_taught(
                    records, [p["prediction"] for p in predictions], taught, language
                )
            if base is not None and len(base.answers) == len(answers.answers):
                row.update(_against_base(answers, base, open_book, gap, records, language, metrics))
            # does each round add? (gen_0's "previous" is the base model: vs_base says it)
            if previous is not None and len(previous.answers) == len(answers.answers):
                row["vs_previous"] = answers.minus(previous)
            previous = answers
        general = _general_scores(folder)
        if general is not None:
            row["general_fact_recall"] = round(float(np.mean(general)), 2)
            if base_general is None and name == "base":
                base_general = general
            elif base_general is not None and len(base_general) == len(general):
                row["general_vs_base"] = paired_interval(general, base_general)
        rows.append(row)
    dev = [r for r in rows if r.get("dev_fact_recall") is not None]
    if dev:  # the first of the highest, so that a tie keeps the cheaper generation
        max(dev, key=lambda r: r["dev_fact_recall"])["best"] = True
    return rows


def _general_scores(folder: Path) -> Optional[list[float]]:
    """Per-pair fact recall on the general questions (data.general), those with facts; None where
    the model did not answer them."""
    if not (folder / "general.jsonl").is_file():
        return None
    scores = [p["fact-recall"] for p in read_jsonl(folder / "general.jsonl")]
    return [x for x in scores if x is not None] or None


def _answers_of(run_dir: Path, folder: str, eval_file: Optional[Path]) -> tuple[list[str], Scored]:
    """One evaluated model of a run (base, base/open_book or gen_<i>): the eval questions it
    answered, and its answers scored."""
    language, metrics = _run_settings(run_dir)
    predictions = _predictions(run_dir / folder)
    if predictions is None:
        raise FileNotFoundError(f"{run_dir / folder}: no predictions (not evaluated yet?)")
    records = _eval_records(run_dir, predictions, eval_file)
    answers = scored([p["prediction"] for p in predictions], records, language, metrics)
    return [r["question"] for r in records], answers


def compare_recipes(
    runs: list[tuple[Path, str]], against: list[tuple[Path, str]], eval_file: Optional[Path] = None
) -> list[dict]:
    """Two recipes, each given as runs (other seeds) and the model folder of each to compare
    (gen_<i>, base): per metric, each recipe's mean, and the difference of the recipes' per-pair
    means over their runs, with its paired interval over the eval pairs. The runs must have
    answered the same eval questions."""
    groups = [[(r, *_answers_of(r, f, eval_file)) for r, f in g] for g in (runs, against)]
    first_run, questions, first = groups[0][0]
    for run, asked, _ in groups[0][1:] + groups[1]:
        if asked != questions:
            raise DataError(f"{run}: answered other eval questions than {first_run}")
    rows = []
    for metric in PER_PAIR:
        if metric not in first.pairs[0]:
            continue
        means = []
        for group in groups:
            per_run = [[p[metric] for p in answers.pairs] for _, _, answers in group]
            means.append(
                [None if None in v else float(np.mean(v)) for v in zip(*per_run, strict=True)]
            )
        kept = [(a, b) for a, b in zip(*means) if a is not None and b is not None]
        if not kept:
            continue
        mine, theirs = [a for a, _ in kept], [b for _, b in kept]
        rows.append(
            {
                "metric": metric,
                "mean": round(float(np.mean(mine)), 2),
                "against_mean": round(float(np.mean(theirs)), 2),
                "difference": paired_interval(mine, theirs),
                "pairs": len(kept),
            }
        )
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| metric | recipe | against | difference [95%] | eval pairs |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['metric']} | {r['mean']:.2f} | {r['against_mean']:.2f} "
            f"| {_interval(r['difference'])} | {r['pairs']} |"
        )
    return "\n".join(lines) + "\n"


def best_generation(rows: list[dict]) -> Optional[str]:
    """The generation with the highest fact recall on the dev split, or None without a dev split."""
    return next((r["model"] for r in rows if r.get("best")), None)


def best_generation_number(run: Path) -> int:
    """The number of a run's best generation by the dev split, as its summary.json marks it; one
    line that asks for --generation N where there is none (`selfevo export`, `export-qa`)."""
    summary = run / "summary.json"
    rows = read_json(summary) if summary.is_file() else []
    if not isinstance(rows, list):
        raise DataError(f"{summary}: damaged (not a list of rows); run selfevo report {run}")
    best = best_generation([r for r in rows if isinstance(r, dict)])
    if best is None:
        raise RunError(
            f"{run}: no best generation (no dev split, or none evaluated yet): pass --generation N"
        )
    number = re.fullmatch(r"gen_(\d+)", str(best))
    if number is None:
        raise DataError(f"{summary}: damaged (best model {best!r}); run selfevo report {run}")
    return int(number[1])


def _against_base(
    generation: Scored,
    base: Scored,
    open_book: Optional[Scored],
    gap: dict,
    records: list[dict],
    language: Language,
    metrics: str,
) -> dict:
    length = int(statistics.median(generation.lengths))
    matched = scored(
        [cut_to_length(a, length, language) for a in base.answers], records, language, metrics
    )
    recovered: dict[str, Optional[float]] = {}
    if open_book is not None:
        for m in PER_PAIR:
            if m not in gap:
                continue
            width = open_book.means[m] - base.means[m]
            low, high = gap[m][1], gap[m][2]
            recovered[m] = (
                None
                if low <= 0 <= high
                else round((generation.means[m] - base.means[m]) / width, 4)
            )
    vs_matched = generation.minus(matched)
    return {
        "recovered": recovered,
        "vs_base": generation.minus(base),
        "length_matched_base": {m: matched.means[m] for m in matched.means if m in PER_PAIR},
        "vs_length_matched_base": vs_matched,
        # a gain is knowledge only where it stands clear of the base model cut to the same length
        "knowledge_shown": {m: interval[1] > 0 for m, interval in vs_matched.items()},
    }


def _headline(rows: list[dict]) -> tuple[str, ...]:
    """The metrics the console and chart lead with: ROUGE-L (the words' form for English) and fact
    recall."""
    word = rows and "rouge-l-stem" in rows[0]
    return ("rouge-l-stem" if word else "rouge-l", "fact-recall")


def _metric_columns(rows: list[dict]) -> tuple[str, ...]:
    extra = tuple(m for m in ("sacrebleu", "rouge-l-stem") if rows and m in rows[0])
    return METRICS + extra + ("fact-recall",)


def _f(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _interval(cell: Optional[list[float]]) -> str:
    return "" if not cell else f"{cell[0]:+.2f} [{cell[1]:+.2f}, {cell[2]:+.2f}]"


def _seconds_total(row: dict) -> str:
    values = [v for v in (row.get("seconds") or {}).values() if v is not None]
    return f"{sum(values):.0f}" if values else ""


def _scored_note(rows: list[dict]) -> str:
    base = rows[0] if rows and rows[0]["model"] == "base" else None
    return f" (over the {base['fact-recall-scored']} references that state a fact)" if base else ""


def markdown_tables(rows: list[dict]) -> str:
    """summary.md: the scores; what each generation recovered of the open-book gap; the controls."""
    columns = _metric_columns(rows)
    checked = any(r.get("dev_fact_recall") is not None for r in rows)
    general = any(r.get("general_fact_recall") is not None for r in rows)
    head = ["model", *(LABELS[m] for m in columns), "QA pairs", "replayed", "seconds"]
    if checked:
        head[-1:-1] = ["dev facts", "retained facts"]
    if general:
        head[-1:-1] = ["general facts", "general vs base [95%]"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def line(name: str, values: dict, row: Optional[dict] = None) -> None:
        row = row or {}
        cells = [
            name + (" (best)" if row.get("best") else ""),
            *(_f(values.get(m)) for m in columns),
        ]
        cells += [
            str(row.get("qa_pairs") or ""),
            "" if row.get("replayed") is None else str(row["replayed"]),
        ]
        if checked:
            cells += [_f(row.get("dev_fact_recall")), _f(row.get("trained_fact_recall"))]
        if general:
            cells += [_f(row.get("general_fact_recall")), _interval(row.get("general_vs_base"))]
        lines.append("| " + " | ".join(cells + [_seconds_total(row)]) + " |")

    for r in rows:
        line(r["model"] + (", closed book" if r["model"] == "base" else ""), r, r)
        if r["model"] == "base":
            if "open_book" in r:
                line("base, open book (the ceiling)", r["open_book"])
            line("the question as the answer", r["question_echo"])
    out = "\n".join(lines) + f"\n\nFact recall in percent{_scored_note(rows)}.\n"
    if rows[0].get("held_out_eval"):
        out += (
            "The eval: no labelled eval set was given (data.eval null), so "
            f"{rows[0]['held_out_eval']} of generation 0's QA pairs were held out, one about "
            "each of a share of the sentences (data.eval_share): questions the model wrote, "
            "never trained on, whose references are the base model's open-book answers. The open "
            "book is close to them by construction; the ceiling is an upper bound, not a human "
            "answer.\n"
        )
    if checked:
        out += (
            "dev facts: fact recall, closed book, on the dev split (generated QA held back from "
            "training; the references are the open-book answers); retained facts: the same on "
            "pairs the generation was trained on. (best): the highest dev facts.\n"
        )
    if general:
        out += (
            "general facts: fact recall, closed book, on general questions outside the domain "
            "(data.general); vs base: the paired bootstrap interval of the change, a drop beyond "
            "its interval is forgetting.\n"
        )
    gens = [r for r in rows if r["model"] != "base"]
    if not gens:
        return out
    measured = [m for m in PER_PAIR if any(m in r.get("recovered", {}) for r in gens)]
    if measured:
        head = ["model", *(LABELS[m] for m in measured)]
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for r in gens:
            lines.append(
                "| "
                + " | ".join([r["model"], *(_pct(r["recovered"].get(m)) for m in measured)])
                + " |"
            )
        out += (
            "\n### Knowledge recovered: (generation - closed-book base) / (open-book base - "
            "closed-book base)\n\n"
            + "\n".join(lines)
            + "\n\nn/a: the open-book gap's own 95% interval holds 0, so there is no gap to "
            "recover.\n"
        )
    taught = [r for r in gens if r.get("facts_taught")]
    if taught:
        lines = [
            "| model | facts taught | stated when taught | stated when not |",
            "|---|---|---|---|",
        ]
        for r in taught:
            t = r["facts_taught"]
            lines.append(
                f"| {r['model']} | {_f(t['taught'])} | {_f(t['stated_taught']) or 'n/a'} | "
                f"{_f(t['stated_untaught']) or 'n/a'} |"
            )
        out += (
            "\n### Where the references' facts are lost\n\n"
            + "\n".join(lines)
            + f"\n\nIn percent of the eval references' {taught[0]['facts_taught']['facts']} facts"
            " (pooled; a yes or no left out): taught, some QA pair trained on so far about the "
            "eval pair's fragment states the fact; stated, the generation's closed-book answer "
            "does. Taught and not stated: learnt as a pair, not retrieved by the eval's wording "
            "(more phrasings, generation.phrasings); not taught: not asked about (more "
            "questions, generation.questions_per_fragment).\n"
        )
    head = [
        "model",
        "median answer length",
        "echoing the question",
        "headline metric",
        "length-matched base",
        "gain over base [95%]",
        "gain over length-matched base [95%]",
        "knowledge?",
        "gain over the generation before [95%]",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    base = rows[0] if rows[0]["model"] == "base" else {}
    for name, r in [("base, closed book", base), ("base, open book", base.get("open_book"))]:
        if r:
            lines.append(
                f"| {name} | {_f(r['answer_length'], 0)} | {_pct(r['restating'])} | | | | | | |"
            )
    for r in gens:
        for m in _headline(rows):
            if m not in r.get("vs_base", {}):
                continue
            verdict = "shown" if r["knowledge_shown"].get(m) else "**not shown to be knowledge**"
            lines.append(
                f"| {r['model']} | {_f(r['answer_length'], 0)} | {_pct(r['restating'])} | "
                f"{LABELS[m]} {_f(r[m])} | "
                f"{_f(r['length_matched_base'][m])} | {_interval(r['vs_base'][m])} | "
                f"{_interval(r['vs_length_matched_base'][m])} | {verdict} | "
                f"{_interval(r.get('vs_previous', {}).get(m))} |"
            )
    out += (
        "\n### Controls: answer length, echo, and the base model at the generation's answer "
        "length\n\n"
        + "\n".join(lines)
        + "\n\nMedian answer length in characters (Chinese) or words (English). Intervals: "
        "paired bootstrap over "
        f"the eval pairs, {DRAWS} draws. A gain is shown to be knowledge where its interval over "
        "the "
        "length-matched base lies above 0. A generation adds to the one before where that "
        "interval lies above 0.\n"
    )
    return out


def summary_table(rows: list[dict], title: str) -> Table:
    """The console's table: the headline metrics, the share of the open-book gap recovered, the
    controls."""
    first, facts = _headline(rows)
    short = "ROUGE-Lw" if first == "rouge-l-stem" else "ROUGE-L"
    caption = (
        ("ROUGE-Lw: word ROUGE-L, stemmed. " if first == "rouge-l-stem" else "")
        + f"facts: fact recall %{_scored_note(rows)}. rec.: share of the open-book gap recovered "
        "(n/a: no gap beyond its interval). len: median answer length. echo: answers restating "
        "their question. "
        f"vs cut base: {short} gain over the base model cut to the same length [95%]."
    )
    table = Table(title=title, caption=caption)
    columns = ("model", "BLEU-4", short, "facts", f"rec. {short}", "rec. facts", "len", "echo")
    for col in (*columns, "vs cut base"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def add(name: str, values: dict, recovered: tuple, controls: bool = True, verdict: str = ""):
        length, echo = (
            (_f(values["answer_length"], 0), _pct(values["restating"])) if controls else ("",) * 2
        )
        scores = (_f(values["bleu-4"]), _f(values[first]), _f(values[facts]))
        table.add_row(name, *scores, *recovered, length, echo, verdict)

    for r in rows:
        if r["model"] == "base":
            add("base, closed", r, ("", ""))
            if "open_book" in r:
                add("base, open", r["open_book"], ("100%", "100%"))
            add("question echo", r["question_echo"], ("", ""), controls=False)
            continue
        recovered = r.get("recovered", {})
        verdict = ""
        if first in r.get("vs_length_matched_base", {}):
            verdict = _interval(r["vs_length_matched_base"][first])
            verdict += "" if r["knowledge_shown"][first] else " not shown"
        add(
            r["model"], r, (_pct(recovered.get(first)), _pct(recovered.get(facts))), verdict=verdict
        )
    return table


def generation_line(rows: list[dict], model: str) -> str:
    """One line on a generation as it finishes: its headline scores, what it recovered, its
    control."""
    row = next((r for r in rows if r["model"] == model), None)
    if row is None:
        return ""
    parts = []
    for m in _headline(rows):
        recovered = row.get("recovered", {})
        share = f", {_pct(recovered.get(m))} of the open-book gap" if m in recovered else ""
        parts.append(f"{LABELS[m]} {_f(row[m])}{share}")
    first = _headline(rows)[0]
    if first in row.get("vs_length_matched_base", {}):
        shown = "a gain" if row["knowledge_shown"][first] else "not shown to be knowledge"
        parts.append(
            f"vs the base at its answer length {_interval(row['vs_length_matched_base'][first])}: "
            f"{shown}"
        )
    if "fact-recall" in row.get("vs_previous", {}):
        parts.append(
            f"fact recall over the generation before {_interval(row['vs_previous']['fact-recall'])}"
        )
    if row.get("dev_fact_recall") is not None:
        parts.append(
            f"dev facts {_f(row['dev_fact_recall'])}, retained {_f(row['trained_fact_recall'])}"
        )
    return f"  {model}: " + "; ".join(parts)


def write_summary(run_dir: str | Path, eval_file: Optional[Path] = None) -> list[dict]:
    """Write summary.json and summary.md into the run directory; return the rows."""
    run_dir = Path(run_dir)
    rows = collect(run_dir, eval_file)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no evaluated generation yet (no metrics.json)")
    write_json(run_dir / "summary.json", rows)
    write_text(run_dir / "summary.md", markdown_tables(rows))
    return rows


def log_knowledge(writer: SummaryWriter, rows: list[dict], model: str, step: int) -> None:
    """TensorBoard: a generation's knowledge recovered and its controls, beside its eval scores."""
    row = next((r for r in rows if r["model"] == model), None)
    if row is None:
        return
    for m, value in row.get("recovered", {}).items():
        if value is not None:
            writer.add_scalar(f"recovered/{m}", 100 * value, step)
    for m, interval in row.get("vs_length_matched_base", {}).items():
        writer.add_scalar(f"vs_length_matched_base/{m}", interval[0], step)
    writer.add_scalar("controls/answer_length", row["answer_length"], step)
    writer.add_scalar("controls/echoing_question", 100 * row["restating"], step)


def write_report(run_dir: str | Path, rows: list[dict]) -> Path:
    """report.png (the headline metrics per generation against the base model closed and open book,
    the length-matched base and the echo baseline, with intervals; the share of the gap recovered)
    and report.md, from write_summary's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    base = rows[0] if rows[0]["model"] == "base" else None
    gens = [r for r in rows if r["model"] != "base"]
    headline = _headline(rows)
    general = base is not None and base.get("general_fact_recall") is not None
    fig, axes = plt.subplots(1, 4 if general else 3, figsize=(20 if general else 15, 4.6))
    for ax, m in zip(axes, headline):
        xs = list(range(len(gens)))
        values = [r[m] for r in gens]
        if base:
            # the interval of the generation's gain over the base model, drawn around the
            # generation's mean
            spans = [r.get("vs_base", {}).get(m, [0, 0, 0]) for r in gens]
            ax.errorbar(
                xs,
                values,
                yerr=[[d[0] - d[1] for d in spans], [d[2] - d[0] for d in spans]],
                marker="o",
                capsize=4,
                label="generation (95% interval of its gain over base)",
            )
            ax.plot(
                xs,
                [r.get("length_matched_base", {}).get(m) for r in gens],
                "s--",
                color="C3",
                label="base cut to the generation's answer length",
            )
            ax.axhline(base[m], color="grey", label="base, closed book")
            if "open_book" in base:
                ax.axhline(
                    base["open_book"][m],
                    color="C2",
                    linestyle=":",
                    label="base, open book (ceiling)",
                )
            ax.axhline(
                base["question_echo"][m],
                color="C1",
                linestyle="-.",
                label="the question as the answer",
            )
        else:
            ax.plot(xs, values, marker="o")
        ax.set_xticks(xs, [r["model"] for r in gens])
        ax.set_title(LABELS[m] + (_scored_note(rows) if m == "fact-recall" else ""), fontsize=9)
        ax.set_ylabel("score (x100)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[2]
    width = 0.8 / len(headline)
    for k, m in enumerate(headline):
        shares = [r.get("recovered", {}).get(m) for r in gens]
        xs = [i + (k - (len(headline) - 1) / 2) * width for i in range(len(gens))]
        bars = ax.bar(xs, [100 * s if s is not None else 0 for s in shares], width, label=LABELS[m])
        ax.bar_label(bars, labels=[_pct(s) for s in shares], fontsize=7)
    ax.set_xticks(range(len(gens)), [r["model"] for r in gens])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("% of the open-book gap recovered")
    ax.set_title("knowledge recovered (n/a: no open-book gap beyond its interval)", fontsize=9)
    ax.legend(fontsize=7)
    if general:  # forgetting: the general questions, before and after each generation
        ax = axes[3]
        xs = list(range(len(gens)))
        spans = [r.get("general_vs_base") or [0, 0, 0] for r in gens]
        ax.errorbar(
            xs,
            [r.get("general_fact_recall") for r in gens],
            yerr=[[d[0] - d[1] for d in spans], [d[2] - d[0] for d in spans]],
            marker="o",
            capsize=4,
            color="C4",
            label="generation (95% interval of its change)",
        )
        ax.axhline(base["general_fact_recall"], color="grey", label="base model")
        ax.set_xticks(xs, [r["model"] for r in gens])
        ax.set_ylabel("fact recall (x100)")
        ax.set_title("general questions (data.general): forgetting", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{run_dir.name}: closed-book eval per generation, against its controls", fontsize=10
    )
    fig.tight_layout()
    png = run_dir / "report.png"
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    write_bytes(png, image.getvalue())
    write_text(
        run_dir / "report.md",
        f"# {run_dir.name}\n\n![scores](report.png)\n\n" + markdown_tables(rows),
    )
    return png
