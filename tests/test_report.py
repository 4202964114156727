"""The report's measures on hand-made run folders: knowledge recovered, its null rule, the
length-matched base, the question-echo baseline, and the paired bootstrap intervals."""

import json
import random

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.evaluate import eval_prompt
from selfevo.prompts import prompts_for
from selfevo.report import (
    collect,
    cut_to_length,
    echoes_question,
    generation_line,
    paired_interval,
    write_report,
    write_summary,
)

N = 30
RECORDS = [
    {
        "fragment": f"The qmeshd daemon of node {i} listens on port {7000 + i}.",
        "question": f"Which port does the daemon of node {i} listen on?",
        "reference": f"It listens on port {7000 + i}.",
    }
    for i in range(N)
]


def write_run(root, base, open_book, generations, language="en"):
    """A run folder as selfevo writes it: config.json, base/ (and base/open_book/), gen_<i>/."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "generation": {"language": language},
        "evaluation": {"metrics": "seed"},
        "data": {"eval": "none"},
    }
    (root / "config.json").write_text(json.dumps({"config": config}))

    def answers(folder, texts):
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{**r, "prediction": t} for r, t in zip(RECORDS, texts)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "metrics.json").write_text("{}")

    answers(root / "base", base)
    if open_book is not None:
        answers(root / "base" / "open_book", open_book)
    for i, texts in enumerate(generations):
        answers(root / f"gen_{i}", texts)
    return root


WRONG = ["The daemon listens on the usual port for its node." for _ in RECORDS]
RIGHT = [r["reference"] for r in RECORDS]


def test_knowledge_recovered_is_the_share_of_the_open_book_gap(tmp_path):
    half = [RIGHT[i] if i % 2 else WRONG[i] for i in range(N)]
    rows = collect(write_run(tmp_path / "run", WRONG, RIGHT, [half, RIGHT]))
    assert [r["model"] for r in rows] == ["base", "gen_0", "gen_1"]
    base, gen_0, gen_1 = rows
    assert (
        base["fact-recall"] == 0
        and base["open_book"]["fact-recall"] == 100
        and base["fact-recall-scored"] == N
    )
    assert gen_0["fact-recall"] == 50 and gen_0["recovered"]["fact-recall"] == pytest.approx(0.5)
    assert gen_1["recovered"]["fact-recall"] == pytest.approx(1.0)
    assert gen_1["recovered"]["rouge-l"] == pytest.approx(1.0)
    low, high = gen_0["vs_base"]["fact-recall"][1:]
    assert 0 < low < 50 < high < 100  # half the answers right: +50 points, with its spread
    assert gen_1["knowledge_shown"]["fact-recall"]
    # what the loop prints as each generation ends
    line = generation_line(rows, "gen_0")
    assert "fact recall 50.00, 50% of the open-book gap" in line and "ROUGE-L" in line


def test_recovered_is_null_where_the_open_book_gap_is_not_resolved(tmp_path):
    rows = collect(write_run(tmp_path / "run", WRONG, WRONG, [RIGHT]))
    assert rows[0]["open_book_gap"]["fact-recall"] == [0.0, 0.0, 0.0]
    assert rows[1]["recovered"]["fact-recall"] is None
    assert (
        "recovered" in rows[1] and rows[1]["fact-recall"] == 100
    )  # the gain itself is still shown


def test_a_gain_of_length_alone_is_not_shown_to_be_knowledge(tmp_path):
    # The base model already states the port, at length; the generation says the same in the
    # reference's five words. ROUGE-L rises beyond its interval, yet the base model's own answers
    # cut to five words score as well: the gain is one of length, not of knowledge.
    base = [
        f"It listens on port {7000 + i}. That is configured in the settings file of the node, and "
        "an "
        "operator may change it later."
        for i in range(N)
    ]
    rows = collect(write_run(tmp_path / "run", base, RIGHT, [RIGHT]))
    gen = rows[1]
    assert gen["answer_length"] == 5
    assert gen["vs_base"]["rouge-l"][1] > 0  # a real gain over the base model...
    assert gen["length_matched_base"]["rouge-l"] == 100  # ...that its answers cut short match
    assert not gen["knowledge_shown"]["rouge-l"]
    assert gen["fact-recall"] == rows[0]["fact-recall"] == 100


def test_question_echo_baseline_and_restating_share(tmp_path):
    echo = [r["question"] for r in RECORDS]
    rows = collect(write_run(tmp_path / "run", WRONG, RIGHT, [echo]))
    assert rows[0]["question_echo"]["rouge-l"] == rows[1]["rouge-l"]
    assert rows[1]["restating"] == 1.0 and rows[0]["restating"] == 0.0


def test_summary_report_and_command_on_run_files_without_questions(tmp_path):
    """Run files that travelled kept only the answers (predictions_slim.jsonl): the eval file fills
    in the questions and references, by position."""
    run = write_run(tmp_path / "run", WRONG, RIGHT, [RIGHT])
    for folder in (run / "base", run / "base" / "open_book", run / "gen_0"):
        slim = [
            {"prediction": json.loads(line)["prediction"]}
            for line in (folder / "predictions.jsonl").open()
        ]
        (folder / "predictions.jsonl").unlink()
        (folder / "predictions_slim.jsonl").write_text("".join(json.dumps(r) + "\n" for r in slim))
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(
        json.dumps(
            [
                {"instruction": r["fragment"], "input": r["question"], "output": r["reference"]}
                for r in RECORDS
            ]
        )
    )
    result = CliRunner().invoke(
        app, ["report", str(run), "--eval", str(eval_file)], env={"COLUMNS": "160"}
    )
    assert result.exit_code == 0, result.output
    assert "base, open" in result.output and "100%" in result.output
    rows = json.loads((run / "summary.json").read_text())
    assert rows[1]["recovered"]["fact-recall"] == pytest.approx(1.0)
    summary = (run / "summary.md").read_text()
    assert "base, open book (the ceiling)" in summary and "Knowledge recovered" in summary
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "![scores](report.png)" in (run / "report.md").read_text()
    assert write_report(run, write_summary(run, eval_file)) == run / "report.png"


def test_facts_taught_split_what_was_never_asked_from_what_was_learnt_but_not_recalled(tmp_path):
    # Generation 0 trains on answers about fragments 0-9 (0-4 with the right port, 5-9 a wrong
    # one), generation 1 on fragments 10-19. gen_0 answers 0-2 and 10-11 right; gen_1 0-9 right.
    run = write_run(
        tmp_path / "run",
        WRONG,
        RIGHT,
        [RIGHT[:3] + WRONG[3:10] + RIGHT[10:12] + WRONG[12:], RIGHT[:10] + WRONG[10:]],
    )

    def qa(gen, pairs):
        (run / f"gen_{gen}" / "qa.jsonl").write_text(
            "".join(
                json.dumps({"fragment": f, "question": "q", "answer": a}) + "\n" for f, a in pairs
            )
        )

    qa(0, [(RECORDS[i]["fragment"], RIGHT[i] if i < 5 else WRONG[i]) for i in range(10)])
    qa(1, [(RECORDS[i]["fragment"], RIGHT[i]) for i in range(10, 20)])
    rows = {r["model"]: r for r in collect(run)}
    # one fact (the port) a reference
    assert rows["gen_0"]["facts_taught"] == {
        "taught": pytest.approx(100 * 5 / N),
        "stated_taught": pytest.approx(100 * 3 / 5),
        "stated_untaught": pytest.approx(100 * 2 / 25),
        "facts": N,
    }
    # what generation 0 taught counts for generation 1 too
    assert rows["gen_1"]["facts_taught"]["taught"] == pytest.approx(100 * 15 / N)
    assert rows["gen_1"]["facts_taught"]["stated_taught"] == pytest.approx(100 * 5 / 15)
    assert rows["gen_1"]["facts_taught"]["stated_untaught"] == pytest.approx(100 * 5 / 15)
    write_summary(run)
    summary = (run / "summary.md").read_text()
    assert "| gen_0 | 16.67 | 60.00 | 8.00 |" in summary


def test_facts_taught_match_fragments_whatever_the_whitespace_around_them(tmp_path):
    run = write_run(tmp_path / "run", WRONG, RIGHT, [RIGHT])
    (run / "gen_0" / "qa.jsonl").write_text(
        json.dumps({"fragment": RECORDS[0]["fragment"] + "\n", "question": "q", "answer": RIGHT[0]})
        + "\n"
    )
    assert collect(run)[1]["facts_taught"]["taught"] == pytest.approx(100 / N)


def test_no_facts_taught_table_where_the_run_trained_on_none_of_the_eval_fragments(tmp_path):
    run = write_run(tmp_path / "run", WRONG, RIGHT, [RIGHT])
    (run / "gen_0" / "qa.jsonl").write_text(
        json.dumps({"fragment": "another document", "question": "q", "answer": RIGHT[0]}) + "\n"
    )
    assert collect(run)[1]["facts_taught"] is None


def test_cut_to_length_counts_words_in_english_and_characters_in_chinese():
    assert cut_to_length("one two  three four", 2, "en") == "one two"
    assert cut_to_length("端口 为8080。", 4, "zh") == "端口 为8"


def test_open_book_prompt_holds_the_fragment_and_the_closed_book_one_does_not(tiny_model):
    from selfevo.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    record = RECORDS[3]
    assert record["fragment"] in eval_prompt(tokenizer, record, prompts_for("en"), open_book=True)
    closed = eval_prompt(tokenizer, record, prompts_for("en"), open_book=False)
    assert record["question"] in closed and record["fragment"] not in closed


def test_echoes_question():
    assert echoes_question("如何填写申请单？", "填写申请单。")
    assert echoes_question(
        "如何在权限分配中为选定的资源分配操作集？", "在权限分配中为选定的资源分配操作集。"
    )
    assert not echoes_question(
        "如何填写申请单？", "在系统中选择合同号，再选择产品线和版本，填写申请原因后提交。"
    )
    assert echoes_question("What is a?", "a") and not echoes_question("What is a?", "b")
    assert not echoes_question("如何填写申请单？", "") and not echoes_question(
        "如何填写申请单？", "。"
    )


def test_paired_interval():
    rng = random.Random(1)
    same = [rng.uniform(0, 30) for _ in range(100)]
    assert paired_interval(same, same) == [0.0, 0.0, 0.0]
    assert paired_interval([x + 2 for x in same], same) == [2.0, 2.0, 2.0]
    base = [rng.uniform(0, 30) for _ in range(100)]
    tight = paired_interval([x + 1 + (0.5 if i % 2 else -0.5) for i, x in enumerate(base)], base)
    loose = paired_interval([x + 1 + (20 if i % 2 else -20) for i, x in enumerate(base)], base)
    assert (
        tight[1] > 0 and loose[1] < 0 < loose[2]
    )  # the same mean gain, resolved only when it is steady
    assert tight[0] == pytest.approx(1.0) and loose[0] == pytest.approx(1.0)
    assert paired_interval(base, base[::-1]) == paired_interval(base, base[::-1])  # seeded
    with pytest.raises(ValueError):
        paired_interval([1.0], [1.0, 2.0])


def test_each_generation_is_compared_with_the_one_before(tmp_path):
    half = [RIGHT[i] if i % 2 else WRONG[i] for i in range(N)]
    run = write_run(tmp_path / "run", WRONG, RIGHT, [half, RIGHT, RIGHT])
    rows = collect(run)
    gen_0, gen_1, gen_2 = rows[1:]
    assert "vs_previous" not in gen_0  # its "before" is the base model: vs_base
    mean, low, high = gen_1["vs_previous"]["fact-recall"]
    assert mean == 50 and 0 < low < 50 < high  # the other half learnt: a gain beyond the interval
    assert gen_2["vs_previous"]["fact-recall"] == [0.0, 0.0, 0.0]  # nothing added
    assert "over the generation before" not in generation_line(rows, "gen_0")
    assert "fact recall over the generation before +50.00 [" in generation_line(rows, "gen_1")
    write_summary(run)
    controls = (run / "summary.md").read_text().split("### Controls")[1]
    last_cell = {  # the fact-recall row's last cell: the gain over the generation before
        line.split("|")[1].strip(): line.split("|")[-2].strip()
        for line in controls.splitlines()
        if "fact recall" in line
    }
    assert last_cell["gen_0"] == "" and last_cell["gen_1"].startswith("+50.00 [")
    assert last_cell["gen_2"] == "+0.00 [+0.00, +0.00]"


def test_compare_two_recipes_over_their_seeds_pair_by_pair(tmp_path):
    """Each recipe's per-pair scores are averaged over its runs; the difference of those means
    comes with its paired interval. A seed that got half the pairs right and one that got all of
    them average to three quarters."""
    half = RIGHT[: N // 2] + WRONG[N // 2 :]
    a0 = write_run(tmp_path / "a", WRONG, RIGHT, [RIGHT])
    a1 = write_run(tmp_path / "a-s1", WRONG, RIGHT, [half])
    b0 = write_run(tmp_path / "b", WRONG, RIGHT, [WRONG])
    result = CliRunner().invoke(
        app, ["compare", "--runs", str(a0), str(a1), "--against", str(b0), "--generation", "0"]
    )
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| fact-recall"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["75.00", "0.00"] and cells[3].startswith("+75.00 [")
    low, high = (float(x) for x in cells[3].split("[")[1].rstrip("]").split(","))
    assert 0 < low < 75 < high <= 100 and cells[4] == str(N)
    # generation 0 against the same runs' base model; runs of other eval questions are refused
    result = CliRunner().invoke(
        app,
        ["compare", "--runs", str(a0), "--against", str(a0), "--generation", "0",
         "--against-generation", "base"],
    )  # fmt: skip
    assert result.exit_code == 0 and "| fact-recall | 100.00 | 0.00 | +100.00" in result.output
    other = tmp_path / "other"
    write_run(other, WRONG, RIGHT, [RIGHT])
    lines = (other / "gen_0" / "predictions.jsonl").read_text().splitlines()
    (other / "gen_0" / "predictions.jsonl").write_text("\n".join(lines[1:]) + "\n")
    result = CliRunner().invoke(
        app, ["compare", "--runs", str(a0), "--against", str(other), "--generation", "0"]
    )
    assert result.exit_code == 2 and "answered other eval questions" in result.output
