"""Which questions a generation asks, and which it keeps: one per sentence, the missed first, and
none that names nothing, recurs across fragments or was asked before."""

from collections import Counter

import pytest

from selfevo.config import GenerationConfig
from selfevo.generate import plan_questions
from selfevo.prompts import fact_sentences, filter_questions, prompts_for
from selfevo.select import split_dev

EN, ZH = prompts_for("en"), prompts_for("zh")

FRAGMENTS = [
    "Quillmesh nodes talk over TCP port 7741 by default. The control API listens on TCP port "
    "7742 and binds only to 127.0.0.1. Discovery uses UDP port 7743 and can be switched off.",
    "A QPULSE heartbeat is sent every 15 seconds, controlled by pulse_interval_s. A peer that "
    "stays silent for 45 seconds is considered lost by qmeshd.",
]


def test_a_fragment_is_cut_into_its_sentences_and_short_pieces_join_the_next():
    assert fact_sentences(FRAGMENTS[1], "en") == [
        "A QPULSE heartbeat is sent every 15 seconds, controlled by pulse_interval_s.",
        "A peer that stays silent for 45 seconds is considered lost by qmeshd.",
    ]
    assert fact_sentences(
        "Note. Ports: see below. The peer port is TCP 7741 by default.", "en"
    ) == ["Note. Ports: see below. The peer port is TCP 7741 by default."]
    # version numbers and abbreviations do not end a sentence
    assert (
        len(fact_sentences("Version 2.3.1 of qmeshd added e.g. the QPULSE message type.", "en"))
        == 1
    )
    zh = "*是→3\n*否→2\n2.重新设置阈值，观察告警是否消失。告警消失后，记录阈值并通知值班人员。"
    assert fact_sentences(zh, "zh") == [
        "*是→3\n*否→2\n2.重新设置阈值，观察告警是否消失。",
        "告警消失后，记录阈值并通知值班人员。",
    ]


def test_each_question_of_a_fragment_is_about_another_sentence_and_the_least_asked_come_first():
    cfg = GenerationConfig(question_focus="sentence", questions_per_fragment=2, phrasings=1)
    plan = plan_questions(FRAGMENTS, cfg, Counter(), set(), seed=0)
    assert [r["id"] for r in plan] == [0, 0, 1, 1]
    assert all(r["focus"] == fact_sentences(FRAGMENTS[r["id"]], "en")[r["unit"]] for r in plan)
    asked = Counter((r["id"], r["unit"]) for r in plan)
    # the next generation asks first what this one did not: fragment 0's third sentence
    again = plan_questions(FRAGMENTS, cfg, asked, set(), seed=1)
    first_units = {r["unit"] for r in plan if r["id"] == 0}
    assert {0, 1, 2} - first_units <= {r["unit"] for r in again if r["id"] == 0}
    assert plan == plan_questions(FRAGMENTS, cfg, Counter(), set(), seed=0)  # seeded


def test_a_missed_sentence_is_asked_first_and_twice():
    cfg = GenerationConfig(question_focus="sentence", questions_per_fragment=1, phrasings=1)
    asked = Counter({(1, 1): 3, (1, 0): 0})
    plan = plan_questions(FRAGMENTS, cfg, asked, {(1, 1)}, seed=0)
    assert [(r["id"], r["unit"]) for r in plan if r["id"] == 1] == [(1, 1), (1, 1)]


def test_each_chosen_sentence_is_asked_in_as_many_phrasings_as_told_and_a_missed_one_once_more():
    cfg = GenerationConfig(question_focus="sentence", questions_per_fragment=2, phrasings=3)
    plan = plan_questions(FRAGMENTS, cfg, Counter(), {(1, 1)}, seed=0)
    per_unit = Counter((r["id"], r["unit"]) for r in plan)
    assert sorted(per_unit.values()) == [3, 3, 3, 4]
    assert per_unit[(1, 1)] == 4
    # the same sentences as with one phrasing: phrasings deepen, questions_per_fragment widens
    one = GenerationConfig(question_focus="sentence", questions_per_fragment=2, phrasings=1)
    assert set(per_unit) == {
        (r["id"], r["unit"]) for r in plan_questions(FRAGMENTS, one, Counter(), {(1, 1)}, seed=0)
    }


def test_nothing_is_asked_about_a_held_out_sentence_or_fragment_even_when_missed():
    cfg = GenerationConfig(question_focus="sentence", questions_per_fragment=3, phrasings=1)
    plan = plan_questions(FRAGMENTS, cfg, Counter(), {(0, 1)}, seed=0, held_out={(0, 1)})
    assert [(r["id"], r["unit"]) for r in plan] == [(0, 0), (0, 2), (1, 0), (1, 1)]
    whole = GenerationConfig(question_focus="fragment", questions_per_fragment=2, phrasings=1)
    plan = plan_questions(FRAGMENTS, whole, Counter(), set(), seed=0, held_out={(0, None)})
    assert [r["id"] for r in plan] == [1, 1]


def test_the_papers_focus_asks_about_the_whole_fragment_as_often_as_told():
    cfg = GenerationConfig(question_focus="fragment", questions_per_fragment=3, phrasings=1)
    plan = plan_questions(FRAGMENTS, cfg, Counter(), set(), seed=0)
    assert [r["id"] for r in plan] == [0, 0, 0, 1, 1, 1]
    assert all("focus" not in r and r["fragment"] == FRAGMENTS[r["id"]] for r in plan)
    # phrasings multiply the samples of the whole fragment's prompt
    cfg = GenerationConfig(question_focus="fragment", questions_per_fragment=1, phrasings=2)
    assert [r["id"] for r in plan_questions(FRAGMENTS, cfg, Counter(), set(), seed=0)] == [
        0,
        0,
        1,
        1,
    ]


def test_questions_that_name_nothing_recur_or_were_asked_before_are_dropped_by_reason():
    fragments = FRAGMENTS + [
        "Quillmesh meshes are groups of folders that nodes keep in sync.",
        "Quillmesh was designed by Ingrid Solvang at Halvard Labs.",
    ]

    def q(fid, text):
        return {"id": fid, "fragment": fragments[fid], "question": text}

    records = [
        q(0, "Which TCP port does the Quillmesh control API listen on?"),
        q(0, "What is the product or topic that this passage discusses?"),  # names nothing
        q(2, "What is Quillmesh?"),  # Quillmesh is in every fragment: nothing particular
        q(1, "How often is a QPULSE heartbeat sent?"),
        q(3, "Who designed it, Solvang?"),
        q(2, "Who designed it, Solvang?"),  # the same question for two fragments
        q(1, "How often is a QPULSE heartbeat sent ?"),  # the same as above, for the same fragment
        q(1, "After how many seconds is a silent peer lost?"),
    ]
    asked_before = {"afterhowmanysecondsisasilentpeerlost"}
    kept, drops = filter_questions(records, fragments, asked_before, EN)
    assert [r["question"] for r in kept] == [
        "Which TCP port does the Quillmesh control API listen on?",
        "How often is a QPULSE heartbeat sent?",
    ]
    assert drops == {"copies_example": 0, "unspecific": 3, "recurring": 1, "asked_before": 2}


COPIES = {  # per language: fragments, then questions of which the first two copy the examples
    "en": (
        FRAGMENTS
        + [
            "The Orvin router keeps its logs for 30 days.",
            "Quillmesh backups of the mesh index run every night; each is kept for a day.",
        ],
        [  # as Qwen2.5-Coder-0.5B wrote them on Black's documentation
            (0, "For how many days does the Quillmesh control API listen?"),
            (1, "What is the QPULSE heartbeat used for in Tessel database backups?"),
            (0, "Which TCP port does the Quillmesh control API listen on?"),
            # the fragment holds the term: a question about it, not a copy
            (2, "For how many days does the Orvin router keep logs?"),
            (3, "For how many days are Quillmesh backups kept?"),
        ],
    ),
    "zh": (
        [
            "在TECSDirector中选择监控中心，查看磁盘告警阈值。",
            "在TECSDirector中导出日志，日志保留7天。",
        ],
        [
            (0, "Tessel数据库的磁盘告警阈值在哪里查看？"),
            (1, "Orvin路由器的日志在TECSDirector中如何导出？"),
            (0, "如何查看磁盘告警阈值？"),
            (1, "TECSDirector导出的日志保留多少天？"),  # the fragment says 7天
        ],
    ),
}


@pytest.mark.parametrize("language", ["en", "zh"])
def test_questions_that_copy_the_prompts_examples_onto_other_sentences_are_dropped(language):
    fragments, asked = COPIES[language]
    records = [{"id": fid, "question": q} for fid, q in asked]
    kept, drops = filter_questions(records, fragments, set(), prompts_for(language))
    assert [r["question"] for r in kept] == [r["question"] for r in records[2:]]
    assert drops["copies_example"] == 2


def test_chinese_questions_are_specific_through_the_han_character_pairs_they_share():
    fragments = [
        "在TECSDirector中选择监控中心，查看磁盘告警阈值。",
        "在TECSDirector中重启虚机。",
        "在TECSDirector中添加用户。",
        "在TECSDirector中导出日志。",
    ]
    records = [
        {"id": 0, "fragment": fragments[0], "question": "如何查看磁盘告警阈值？"},
        {"id": 1, "fragment": fragments[1], "question": "TECSDirector是什么？"},
    ]
    kept, drops = filter_questions(records, fragments, set(), ZH)
    assert [r["id"] for r in kept] == [0] and drops["unspecific"] == 1


def test_the_dev_split_is_a_seeded_share_held_back_in_order():
    pairs = [{"id": i, "question": f"q{i}"} for i in range(20)]
    train, dev = split_dev(pairs, 0.1, seed=3)
    assert len(dev) == 2 and len(train) == 18
    assert sorted(train + dev, key=lambda p: p["id"]) == pairs
    assert dev == split_dev(pairs, 0.1, seed=3)[1]
    assert split_dev(pairs, 0.0, seed=3) == (pairs, [])
    assert split_dev(pairs[:1], 0.5, seed=3) == (pairs[:1], [])


def test_the_dev_split_holds_back_every_wording_of_a_sentence_or_none():
    pairs = [
        {"id": i // 4, "unit": i % 4, "question": f"q{i}-{w}"} for i in range(20) for w in range(3)
    ]
    train, dev = split_dev(pairs, 0.1, seed=3)
    assert len(dev) == 2 * 3
    held = {(p["id"], p["unit"]) for p in dev}
    assert not held & {(p["id"], p["unit"]) for p in train}
    # one wording a sentence: the same split as pair by pair
    single = [p for p in pairs if p["question"].endswith("-0")]
    plain = [{"id": n, "question": p["question"]} for n, p in enumerate(single)]
    assert [p["question"] for p in split_dev(single, 0.1, seed=3)[1]] == [
        p["question"] for p in split_dev(plain, 0.1, seed=3)[1]
    ]
    # questions about whole fragments: the pairs of one fragment go to one side together
    whole = [{"id": i // 3, "question": f"q{i}"} for i in range(30)]
    train, dev = split_dev(whole, 0.1, seed=3)
    assert len(dev) == 3 and not {p["id"] for p in dev} & {p["id"] for p in train}
