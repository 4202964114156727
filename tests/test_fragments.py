"""Choosing the training fragments: data.limit, data.include_eval and data.fill."""

import pytest

from selfevo.config import DataConfig
from selfevo.data import DataError, select_fragments
from tests.test_bad_input import run_bad

FRAGMENTS = [f"fragment {i}" for i in range(10)]
EVAL = [
    {"fragment": "fragment 7", "question": "q?", "reference": "a"},
    {
        "fragment": " fragment 2\n",
        "question": "q2?",
        "reference": "b",
    },  # stripped, as fragments are
    {"fragment": "fragment 7", "question": "q3?", "reference": "c"},
]


def choose(limit=None, include_eval=False, fill="first", seed=0, eval_set=EVAL):
    data = DataConfig(
        fragments="f.json", eval="e.json", limit=limit, include_eval=include_eval, fill=fill
    )
    return select_fragments(FRAGMENTS, eval_set, data, seed)


def test_defaults_keep_the_first_n_in_file_order():
    assert choose() == (FRAGMENTS, 0)
    assert choose(limit=3) == (FRAGMENTS[:3], 0)
    assert choose(limit=30) == (FRAGMENTS, 0)


def test_eval_fragments_are_kept_and_the_first_others_fill_the_limit():
    chosen, from_eval = choose(limit=5, include_eval=True)
    assert chosen == [
        "fragment 0",
        "fragment 1",
        "fragment 2",
        "fragment 3",
        "fragment 7",
    ]  # file order
    assert from_eval == 2  # two distinct eval fragments
    assert choose(limit=2, include_eval=True) == (["fragment 2", "fragment 7"], 2)
    assert choose(include_eval=True) == (
        FRAGMENTS,
        2,
    )  # no limit: all, the eval fragments among them


def test_random_fill_is_seeded_deterministic_and_keeps_file_order():
    a, _ = choose(limit=6, include_eval=True, fill="random", seed=1)
    assert a == choose(limit=6, include_eval=True, fill="random", seed=1)[0]
    assert {"fragment 2", "fragment 7"} <= set(a) and len(a) == 6
    assert a == sorted(a, key=FRAGMENTS.index)
    others = {tuple(choose(limit=6, include_eval=True, fill="random", seed=s)[0]) for s in range(8)}
    assert len(others) > 1  # the seed matters
    b, from_eval = choose(limit=4, fill="random", seed=3)
    assert len(b) == 4 and from_eval == 0 and b == sorted(b, key=FRAGMENTS.index)


def test_bad_choices_name_the_file_and_record():
    with pytest.raises(
        DataError, match=r"^e\.json: record 1: its fragment .* not among the fragments of f\.json"
    ):
        choose(
            limit=5, include_eval=True, eval_set=EVAL[:1] + [{**EVAL[1], "fragment": "elsewhere"}]
        )
    with pytest.raises(
        DataError, match=r"^e\.json: holds 2 distinct fragments, .* more than data\.limit \(1\)"
    ):
        choose(limit=1, include_eval=True)


# Through `selfevo evolve`: exit code 2, one line, nothing written (run_bad checks all three).
F = (
    b'[{"instruction": "qmeshd listens on port 7741."}, '
    b'{"instruction": "qmeshd logs to /var/log/q."}]'
)
E = b'[{"instruction": "qmeshd listens on port 7741.", "input": "Which port?", "output": "7741."}]'


@pytest.fixture(autouse=True)
def model_env(tiny_model, monkeypatch):
    monkeypatch.setenv("SELFEVO_TEST_MODEL", tiny_model)


def test_eval_fragment_missing_from_the_fragment_file(tmp_path):
    elsewhere = b'[{"instruction": "a fragment of another file", "input": "q?", "output": "a."}]'
    run_bad(
        tmp_path,
        "--data.include_eval",
        "true",
        "--data.limit",
        "2",
        fragments=F,
        eval_bytes=elsewhere,
        needles=[
            str(tmp_path / "inputs" / "eval.json"),
            "record 0: its fragment ('instruction') is not among",
        ],
    )


def test_limit_below_the_eval_fragments(tmp_path):
    two = (
        E[:-1]
        + b', {"instruction": "qmeshd logs to /var/log/q.", "input": "Where?", "output": "There."}]'
    )
    run_bad(
        tmp_path,
        "--data.include_eval",
        "true",
        "--data.limit",
        "1",
        fragments=F,
        eval_bytes=two,
        needles=["holds 2 distinct fragments", "data.limit (1)"],
    )


def test_misspelt_fill(tmp_path):
    run_bad(
        tmp_path,
        "--data.fill",
        "shuffled",
        fragments=F,
        eval_bytes=E,
        needles=['Parser key "data.fill"'],
    )
