import math

import pytest

from selfevo.select import draw_anchors, select_replay, split_eval


def history(n=10):
    return [{"id": i, "ifd": i / 10} for i in range(n)]


def ids(pairs):
    return [p["id"] for p in pairs]


def test_hard_takes_highest_ifd_and_easy_lowest():
    assert ids(select_replay(history(), "hard", 3, 0)) == [9, 8, 7]
    assert ids(select_replay(history(), "easy", 3, 0)) == [0, 1, 2]


def test_even_takes_every_n_over_k_th_of_sorted_history():
    assert ids(select_replay(history(), "even", 3, 0)) == [0, 3, 6]
    assert ids(select_replay(history(), "even", 5, 0)) == [0, 2, 4, 6, 8]


def test_random_is_seeded_and_all_takes_everything():
    a = select_replay(history(), "random", 4, seed=1)
    assert a == select_replay(history(), "random", 4, seed=1)
    assert len({p["id"] for p in a}) == 4
    assert ids(select_replay(history(), "all", 2, 0)) == list(range(10))


def test_missing_or_nan_ifd_counts_as_one():
    pairs = [
        {"id": 0, "ifd": 0.5},
        {"id": 1},
        {"id": 2, "ifd": math.nan},
        {"id": 3, "ifd": 1.5},
        {"id": 4, "ifd": None},
    ]
    assert ids(select_replay(pairs, "hard", 4, 0)) == [3, 1, 2, 4]
    assert ids(select_replay(pairs, "easy", 1, 0)) == [0]


def test_k_larger_than_history_and_zero():
    assert len(select_replay(history(3), "hard", 10, 0)) == 3
    assert len(select_replay(history(3), "random", 10, 0)) == 3
    assert select_replay(history(3), "hard", 0, 0) == []
    assert select_replay([], "hard", 5, 0) == []


@pytest.mark.parametrize("mode, k", [("hardest", 1), ("hard", -1)])
def test_bad_arguments_raise(mode, k):
    with pytest.raises(ValueError):
        select_replay(history(), mode, k, 0)


def test_anchors_are_a_number_or_a_share_of_the_training_set_repeated_as_needed():
    answers = history(5)

    def drawn(trained=40, pairs=100, share=None, seed=0):
        return ids(draw_anchors(answers, seed, pairs=pairs, share=share, trained=trained))

    assert drawn(pairs=3) == drawn(pairs=3) and len(set(drawn(pairs=3))) == 3  # seeded sample
    assert sorted(drawn(pairs=100)) == [0, 1, 2, 3, 4]  # at most every answer
    assert sorted(drawn(share=0.2)) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # 10 of 50: each twice
    twelve = drawn(share=0.2, trained=48)  # 12 of 60: each twice and a sample of 2
    assert len(twelve) == 12 and sorted(twelve.count(i) for i in range(5)) == [2, 2, 2, 3, 3]
    assert len(drawn(share=0.2, trained=4)) == 1  # 1 of 5
    assert drawn(pairs=0) == []


def test_the_held_out_eval_takes_one_phrasing_of_a_sentence_and_leaves_one_to_train_on():
    pairs = [{"id": f, "unit": u, "question": f"q{f}{u}"} for f in range(4) for u in range(2)]
    pairs = [{**p, "question": p["question"] + str(k)} for p in pairs for k in range(2)]
    train, held = split_eval(pairs, 0.25, seed=0)
    assert len(held) == 2 and len(train) == len(pairs) - 2  # 2 of 8 sentences, one pair each
    for h in held:  # the sentence's other phrasing is trained on
        assert any((p["id"], p["unit"]) == (h["id"], h["unit"]) for p in train)
    assert split_eval(pairs, 0.25, seed=0) == (train, held)


def test_nothing_to_hold_out_of_too_few_pairs():
    assert split_eval([], 0.1, seed=0) == ([], [])
    one = [{"id": 0, "unit": 0, "question": "q"}]
    assert split_eval(one, 0.1, seed=0) == (one, [])  # its only pair must stay to train on
