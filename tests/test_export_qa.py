"""`selfevo export-qa`: a generation's training QA pairs as Alpaca, ShareGPT or OpenAI messages for
LLaMA-Factory, read back with Hugging Face `datasets`, from a real 2-generation run of the tiny
model with anchors, fragment texts, replay and fragments that name their source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
from typer.testing import CliRunner

from selfevo.data import DataError
from selfevo.export_qa import export_qa
from selfevo.rundir import RunError, file_digest
from tests.helpers import ROOT, evolve_args, write_records

SOURCED = 3  # the first fragments name their file and place; the others say nothing of it


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> Path:
    """A finished 2-generation tiny run (about 10 s): anchors, fragments as plain text, replay."""
    import selfevo.loop
    from selfevo.cli import app

    root = tmp_path_factory.mktemp("export-qa")
    fragments = json.loads((ROOT / "data" / "quillmesh_fragments.json").read_text())[:6]
    for i, r in enumerate(fragments[:SOURCED]):
        r.update(source="docs/quillmesh.md", position=10 + i)
    anchors = [{"question": q} for q in ("Explain gravity.", "What is rain?", "Name a colour.")]
    eval_set = json.loads((ROOT / "data" / "quillmesh_eval.json").read_text())[:4]
    inputs = (
        write_records(root / "fragments.json", fragments),
        write_records(root / "eval.json", eval_set),
    )
    options = ("--train.anchors", str(write_records(root / "anchors.json", anchors)))
    options += ("--train.anchor_pairs", "3", "--train.fragment_weight", "1")
    with pytest.MonkeyPatch.context() as patch:
        # The random model's closed-book answers clean to nothing, and empty anchor answers are not
        # kept: give each a text, so that anchors reach the training sets.
        patch.setattr(selfevo.loop, "clean_answer", lambda text: f"In general: {text.strip()}")
        result = CliRunner().invoke(app, evolve_args(tiny_model, inputs, root, "t", *options))
    assert result.exit_code == 0, result.output
    return root / "runs" / "t"


@pytest.fixture()
def run(finished, tmp_path) -> Path:
    """A copy of the run whose summary marks gen_0 best (the random model states no facts, so the
    dev split picks none): the default is the best generation, not the last."""
    run = shutil.copytree(finished, tmp_path / "t")
    rows = json.loads((run / "summary.json").read_text())
    for row in rows:
        row.pop("best", None)
        if row["model"] == "gen_0":
            row["best"] = True
    (run / "summary.json").write_text(json.dumps(rows))
    return run


def load(path: Path, tmp_path: Path) -> datasets.Dataset:
    return datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache")
    )


def trained_pairs(run: Path, n: int) -> dict[tuple[str, str], dict]:
    """What generation n trained on about the domain, from the files the loop wrote beside
    train.jsonl: its own scored pairs and those it replayed."""
    gen = run / f"gen_{n}"
    pairs = read_jsonl(gen / "qa.jsonl") + read_jsonl(gen / "replay.jsonl")
    return {(p["question"], p["answer"]): p for p in pairs}


def anchor_answers(run: Path) -> set[str]:
    return {p["answer"] for p in read_jsonl(run / "base" / "anchors.jsonl")}


def test_the_run_holds_what_is_left_out(run):
    """The fixture is worth its time: both training sets hold anchors, fragment texts and (gen_1)
    replayed pairs."""
    for n in (0, 1):
        train = read_jsonl(run / f"gen_{n}" / "train.jsonl")
        assert sum("text" in r for r in train) == 6
        assert sum(r.get("answer") in anchor_answers(run) for r in train) == 3
    assert len(read_jsonl(run / "gen_1" / "replay.jsonl")) == 3


def test_alpaca_by_default_the_best_generation_closed_book(run, tmp_path):
    result = export_qa(run, None, "alpaca")
    assert result.generation == 0 and result.path == run / "export_qa" / "t_gen0_alpaca.json"
    data = load(result.path, tmp_path)
    assert {"instruction", "input", "output", "ifd", "generation"} <= set(data.column_names)
    expected = trained_pairs(run, 0)
    got = list(zip(data["instruction"], data["output"]))
    assert len(got) == len(set(got)) == result.written and set(got) == set(expected)
    assert set(data["input"]) == {""}  # closed book, as the loop trains
    # `datasets` reads a JSON list through pandas' ujson, keeping 10 significant digits
    assert list(data["ifd"]) == pytest.approx([expected[k]["ifd"] for k in got], abs=1e-9)
    assert set(data["generation"]) == {0}
    assert not anchor_answers(run) & set(data["output"])
    assert result.dropped == {"fragment_texts": 6, "anchors": 3}


def test_questions_are_exported_in_the_runs_closed_book_prompt(run, tmp_path):
    """A run with prompts.closed_book trained on each question in that template: the dataset asks
    as it was taught."""
    snapshot = json.loads((run / "config.json").read_text())
    snapshot["config"]["prompts"] = {"closed_book": "{question} Answer in one sentence."}
    (run / "config.json").write_text(json.dumps(snapshot))
    data = load(export_qa(run, None, "messages").path, tmp_path)
    questions = {q for q, _ in trained_pairs(run, 0)}
    asked = {turns[0]["content"] for turns in data["messages"]}
    assert asked == {f"{q} Answer in one sentence." for q in questions}


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
def test_each_format_loads_with_the_fragment_where_asked(run, tmp_path, fmt):
    expected = trained_pairs(run, 1)
    closed = load(export_qa(run, tmp_path / "closed", fmt, generation=1).path, tmp_path)
    opened = load(
        export_qa(run, tmp_path / "open", fmt, generation=1, with_fragment=True).path, tmp_path
    )
    assert len(closed) == len(opened) == len(expected)
    for plain, with_fragment in zip(closed, opened):
        if fmt == "alpaca":
            key, fragment = (plain["instruction"], plain["output"]), with_fragment["input"]
            assert plain["input"] == ""
        elif fmt == "sharegpt":
            key = (plain["conversations"][0]["value"], plain["conversations"][1]["value"])
            assert plain["conversations"] == [
                {"from": "human", "value": key[0]},
                {"from": "gpt", "value": key[1]},
            ]
            assert "system" not in closed.column_names
            assert with_fragment["conversations"] == plain["conversations"]
            fragment = with_fragment["system"]
        else:
            key = (plain["messages"][0]["content"], plain["messages"][1]["content"])
            assert plain["messages"] == [
                {"role": "user", "content": key[0]},
                {"role": "assistant", "content": key[1]},
            ]
            system, *turns = with_fragment["messages"]
            assert system["role"] == "system" and turns == plain["messages"]
            fragment = system["content"]
        assert fragment == expected[key]["fragment"]
    # gen_1 trains on its own pairs and on gen_0's it replays, each with its generation
    assert sorted(set(closed["generation"])) == [0, 1]


def test_min_ifd_keeps_exactly_the_pairs_at_or_above(run, tmp_path):
    expected = trained_pairs(run, 1)
    ifds = sorted(p["ifd"] for p in expected.values())
    threshold = ifds[len(ifds) // 2]  # a pair's own IFD: at the threshold is kept
    result = export_qa(run, tmp_path, "alpaca", generation=1, min_ifd=threshold)
    data = load(result.path, tmp_path)
    kept = {k for k, p in expected.items() if p["ifd"] >= threshold}
    assert set(zip(data["instruction"], data["output"])) == kept and len(data) == len(kept)
    assert min(data["ifd"]) == pytest.approx(threshold, abs=1e-9)
    assert result.dropped["below_min_ifd"] == len(expected) - len(kept)
    with pytest.raises(
        RunError, match=r"gen_1: no QA pair to export \(left out: .*; lower --min-ifd$"
    ):
        export_qa(run, tmp_path / "none", "alpaca", generation=1, min_ifd=ifds[-1] + 1)
    assert not (tmp_path / "none").exists()


def test_pairs_of_an_unscored_generation_have_no_ifd_and_min_ifd_drops_them(run, tmp_path):
    """Killed after training, before scoring: gen_1's own pairs come from answers.jsonl, without
    IFD; the pairs it replayed have theirs."""
    (run / "gen_1" / "qa.jsonl").unlink()
    replayed = {(p["question"], p["answer"]) for p in read_jsonl(run / "gen_1" / "replay.jsonl")}
    data = load(export_qa(run, tmp_path / "all", "alpaca", generation=1).path, tmp_path)
    for q, a, ifd in zip(data["instruction"], data["output"], data["ifd"]):
        assert (ifd is not None) == ((q, a) in replayed)
    result = export_qa(run, tmp_path / "min", "alpaca", generation=1, min_ifd=0.0)
    assert result.written == len(replayed)
    assert result.dropped["no_ifd"] == len(data) - len(replayed)


def test_without_a_best_generation_it_asks_for_one(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "t")  # the dev split picked none
    with pytest.raises(RunError, match=r"no best generation .*: pass --generation N$"):
        export_qa(run, None, "alpaca")
    (run / "summary.json").unlink()
    with pytest.raises(RunError, match="pass --generation N"):
        export_qa(run, None, "alpaca")
    assert export_qa(run, None, "alpaca", generation=1).generation == 1


def test_dataset_info_has_each_entry_and_keeps_the_others(run, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    other = {"mine": {"file_name": "mine.json", "columns": {"prompt": "q"}}}
    (out / "dataset_info.json").write_text(json.dumps(other))
    export_qa(run, out, "alpaca")
    export_qa(run, out, "sharegpt", with_fragment=True)
    result = export_qa(run, out, "messages")
    info = json.loads(result.dataset_info.read_text())
    assert result.dataset_info == out / "dataset_info.json"
    assert info == {
        **other,
        "t_gen0_alpaca": {
            "file_name": "t_gen0_alpaca.json",
            "columns": {"prompt": "instruction", "query": "input", "response": "output"},
        },
        "t_gen0_sharegpt": {
            "file_name": "t_gen0_sharegpt.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": {
                "role_tag": "from",
                "content_tag": "value",
                "user_tag": "human",
                "assistant_tag": "gpt",
            },
        },
        "t_gen0_messages": {
            "file_name": "t_gen0_messages.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        },
    }
    for name in ("t_gen0_alpaca", "t_gen0_sharegpt", "t_gen0_messages"):  # each file loads
        assert len(load(out / info[name]["file_name"], tmp_path)) == result.written
    assert not list(out.glob(".*.tmp"))  # written atomically: no temporary file left
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset_info.json").write_text("[]")
    with pytest.raises(DataError, match=r"dataset_info.json: not a JSON object of datasets"):
        export_qa(run, tmp_path / "bad", "alpaca")
    assert [p.name for p in (tmp_path / "bad").iterdir()] == ["dataset_info.json"]


def test_source_and_position_are_carried_where_the_fragment_gave_them(run, tmp_path):
    data = load(export_qa(run, tmp_path, "messages", generation=1).path, tmp_path)
    ids = {(p["question"], p["answer"]): p["id"] for p in trained_pairs(run, 1).values()}
    sourced = 0
    for row in data:
        turns = row["messages"]
        fragment = ids[(turns[0]["content"], turns[1]["content"])]
        if fragment < SOURCED:
            assert (row["source"], row["position"]) == ("docs/quillmesh.md", 10 + fragment)
            sourced += 1
        else:
            assert row["source"] is None and row["position"] is None
    assert 0 < sourced < len(data)


def rewrite_training_set(run: Path, n: int, records: list[dict]) -> None:
    """Replace gen_n/train.jsonl, keeping stages.json's checksum of it right if it records one."""
    path = run / f"gen_{n}" / "train.jsonl"
    write_jsonl(path, records)
    stages = json.loads((run / f"gen_{n}" / "stages.json").read_text())
    if "train.jsonl" in stages["train"]["files"]:
        stages["train"]["files"]["train.jsonl"] = file_digest(path)
        (run / f"gen_{n}" / "stages.json").write_text(json.dumps(stages))


def test_a_training_set_of_questions_and_answers_alone_is_joined(run, tmp_path):
    """train.jsonl as the loop wrote it before it kept origins and marked anchors: the pairs are
    joined with the files that produced them, the anchors told apart by base/anchors.jsonl, and a
    pair trained on twice is exported once."""
    before = export_qa(run, tmp_path / "before", "alpaca", generation=1)
    train = read_jsonl(run / "gen_1" / "train.jsonl")
    bare = [r if "text" in r else {"question": r["question"], "answer": r["answer"]} for r in train]
    first = next(r for r in bare if "question" in r and r["answer"] not in anchor_answers(run))
    rewrite_training_set(run, 1, bare + [first])
    after = export_qa(run, tmp_path / "after", "alpaca", generation=1)
    assert after.path.read_text() == before.path.read_text()
    assert after.dropped == {**before.dropped, "repeats": 1}


def test_a_damaged_or_missing_run_is_one_line_that_names_the_file(run, tmp_path):
    with pytest.raises(RunError, match=rf"^{tmp_path}/nothing/config.json: missing"):
        export_qa(tmp_path / "nothing", None, "alpaca")
    with pytest.raises(RunError, match=r"gen_7: missing; the run has no generation 7$"):
        export_qa(run, None, "alpaca", generation=7)
    train = run / "gen_1" / "train.jsonl"
    train.write_bytes(train.read_bytes()[:-20])
    with pytest.raises(DataError, match=rf"^{train}: truncated"):
        export_qa(run, None, "alpaca", generation=1)
    train.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{train}: damaged \(not UTF-8 at byte 10\)$"):
        export_qa(run, None, "alpaca", generation=1)
    train.write_text('{"question": "q"}\n')
    with pytest.raises(
        DataError, match=rf"^{train}: line 1: neither a QA pair nor a fragment text"
    ):
        export_qa(run, None, "alpaca", generation=1)
    train.unlink()
    with pytest.raises(RunError, match=rf"^{train}: missing"):
        export_qa(run, None, "alpaca", generation=1)
    qa = run / "gen_0" / "qa.jsonl"
    qa.write_text(qa.read_text().replace('"answer": "', '"answer": "x', 1))
    with pytest.raises(RunError, match=rf"^{qa}: changed or damaged .*delete {qa.parent}/qa.jsonl"):
        export_qa(run, None, "alpaca")
    stages = json.loads((run / "gen_0" / "stages.json").read_text())
    del stages["train"]
    (run / "gen_0" / "stages.json").write_text(json.dumps(stages))
    with pytest.raises(RunError, match="generation 0 has not finished training"):
        export_qa(run, None, "alpaca")
    assert not (run / "export_qa").exists()  # nothing written


def test_the_command(run, tmp_path):
    from selfevo.cli import app

    if "export-qa" not in {c.name for c in app.registered_commands}:
        pytest.skip("selfevo export-qa is not in selfevo/cli.py yet")
    out = tmp_path / "out"
    args = ["export-qa", str(run), "--format", "sharegpt", "--min-ifd", "0", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "the best generation by the dev split: gen_0" in result.output
    assert (out / "t_gen0_sharegpt.json").is_file() and (out / "dataset_info.json").is_file()
    result = CliRunner().invoke(app, ["export-qa", str(run), "--format", "csv"])
    assert result.exit_code == 2 and "csv" in result.output
    (run / "summary.json").unlink()
    result = CliRunner().invoke(app, ["export-qa", str(run), "--format", "alpaca"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith("pass --generation N")
