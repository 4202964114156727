import pytest

from selfevo.data import DataError, load_eval, load_fragments, load_qa, load_questions
from selfevo.rundir import read_jsonl, write_jsonl
from tests.helpers import ROOT, SHARED, write_records


def test_fragments_from_json_list_and_jsonl_agree(tmp_path):
    records = [{"instruction": "alpha"}, {"text": "beta"}, {"instruction": "alpha"}]
    as_list = load_fragments(write_records(tmp_path / "a.json", records))
    as_lines = load_fragments(write_records(tmp_path / "a.jsonl", records, jsonl=True))
    assert as_list == as_lines == (["alpha", "beta"], [{}, {}], 1)


def test_fragments_keep_their_source_and_position(tmp_path):
    records = [
        {"text": "alpha", "source": "docs/a.md", "position": 0},
        {"text": "beta", "source": "docs/a.md", "position": 1},
        {"text": "alpha", "source": "docs/b.md", "position": 0},  # a duplicate: the first wins
    ]
    fragments, origins, dropped = load_fragments(write_records(tmp_path / "f.jsonl", records))
    assert fragments == ["alpha", "beta"] and dropped == 1
    assert origins == [
        {"source": "docs/a.md", "position": 0},
        {"source": "docs/a.md", "position": 1},
    ]


@pytest.mark.parametrize("position", [-1, 1.5, "3", True])
def test_a_fragment_position_that_is_no_whole_number_is_refused(tmp_path, position):
    path = write_records(tmp_path / "f.json", [{"text": "a", "source": "x", "position": position}])
    with pytest.raises(DataError, match=r"f\.json: record 0: field 'position' must be a whole"):
        load_fragments(path)


@pytest.mark.skipif(
    not (SHARED / "data" / "AIOps_data.json").exists(), reason="../shared/data not present"
)
def test_aiops_fragments_deduplicate_to_2879():
    fragments, _, dropped = load_fragments(SHARED / "data" / "AIOps_data.json")
    assert (len(fragments), dropped) == (2879, 1121)


def test_eval_records_map_seed_fields(tmp_path):
    path = write_records(tmp_path / "e.json", [{"instruction": "f", "input": "q?", "output": "a"}])
    assert load_eval(path) == [{"fragment": "f", "question": "q?", "reference": "a"}]


def test_qa_accepts_seed_field_names(tmp_path):
    path = write_records(tmp_path / "qa.json", [{"input": "q?", "output": "a"}])
    assert [(r["question"], r["answer"]) for r in load_qa(path)] == [("q?", "a")]


def test_jsonl_round_trip_and_truncation_detected(tmp_path):
    path = tmp_path / "x.jsonl"
    records = [{"q": "中文", "n": 1}, {"q": "b", "n": 2}]
    write_jsonl(path, records)
    assert read_jsonl(path) == records
    path.write_text(path.read_text()[:-3], encoding="utf-8")
    with pytest.raises(DataError, match="truncated"):
        read_jsonl(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_anchor_instructions_share_no_question_with_the_general_set():
    # The general set measures forgetting; an anchor trained on one of its questions would hide it.
    anchors = {q.strip().lower() for q in load_questions(ROOT / "data" / "anchor_prompts.json")}
    general = {q.strip().lower() for q in load_questions(ROOT / "data" / "general_qa.json")}
    assert len(anchors) == 224 and len(general) == 60
    assert not anchors & general
