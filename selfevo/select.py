"""What is trained on: the dev split and (without a labelled eval set) the eval held back, the
fragments as plain text, and the replay set from earlier generations' QA pairs, by IFD."""

from __future__ import annotations

import math
import random
from typing import Literal


def held_out_unit(pair: dict) -> tuple[int, int | None]:
    """What a dev pair keeps out of training: its sentence (fragment id, sentence number), or its
    whole fragment (fragment id, None) where questions are about whole fragments."""
    return pair["id"], pair.get("unit")


def split_dev(pairs: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, dev): a seeded `share` of the pairs held back as the dev split (at least one pair
    when share > 0 and there are two or more), both in their input order. The pairs about one
    sentence (generation.phrasings asks it in several wordings), or without sentences about one
    fragment, go to one side together: a dev pair whose fact was trained on in other words would
    not be unseen. Later generations ask nothing about them (`held_out_unit`)."""
    groups: dict[object, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(held_out_unit(p), []).append(i)
    if share <= 0 or len(groups) < 2:
        return list(pairs), []
    keys = list(groups)
    n = min(len(keys) - 1, max(1, round(len(keys) * share)))
    held = {i for k in random.Random(seed).sample(range(len(keys)), n) for i in groups[keys[k]]}
    return (
        [p for i, p in enumerate(pairs) if i not in held],
        [p for i, p in enumerate(pairs) if i in held],
    )


def split_eval(pairs: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) for a run without a labelled eval set: of a seeded `share` of the sentences
    (fragments, where questions are about whole fragments), one pair each held out as the eval, in
    input order. Its question is never trained on; the fact it asks for is, in the sentence's other
    phrasings, as a labelled eval set asks in its own words about facts the run trains on. Sentences
    asked in two or more phrasings are chosen where there are any."""
    groups: dict[object, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(held_out_unit(p), []).append(i)
    phrased = [k for k, members in groups.items() if len(members) > 1]
    keys = phrased or list(groups)
    room = len(keys) if phrased else len(keys) - 1  # a pair about each sentence left to train on
    n = max(0, min(room, max(1, round(len(groups) * share)))) if share > 0 else 0
    # A draw of its own, not split_dev's: the same seed would pick the same sentences.
    held = {groups[k][0] for k in random.Random(f"eval-{seed}").sample(keys, n)}
    return (
        [p for i, p in enumerate(pairs) if i not in held],
        [p for i, p in enumerate(pairs) if i in held],
    )


Mode = Literal["hard", "easy", "even", "random", "all"]
MODES: tuple[str, ...] = ("hard", "easy", "even", "random", "all")


def ifd_of(pair: dict) -> float:
    """A missing or NaN IFD counts as 1 (the seed's convention)."""
    value = pair.get("ifd")
    return (
        1.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    )


def select_replay(history: list[dict], mode: Mode, k: int, seed: int) -> list[dict]:
    """k pairs of `history` (all of it for mode "all"); ties keep history order, so results
    reproduce."""
    if mode not in MODES:
        raise ValueError(f"unknown replay mode {mode!r}; choose one of {', '.join(MODES)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if mode == "all":
        return list(history)
    if k == 0 or not history:
        return []
    if mode == "random":
        return random.Random(seed).sample(history, min(k, len(history)))
    ascending = sorted(history, key=ifd_of)  # stable sort
    if mode == "easy":
        return ascending[:k]
    if mode == "hard":
        return sorted(history, key=ifd_of, reverse=True)[:k]
    # even: every (n // k)-th pair of the sorted history, at most k of them
    step = max(1, len(ascending) // k)
    return ascending[::step][:k]


def draw_anchors(
    answers: list[dict], seed: int, *, pairs: int, share: float | None, trained: int
) -> list[dict]:
    """The base model's anchor answers to train on beside `trained` other records: `pairs` of them
    (at most all), or with a `share`, as many as make up that share of the whole. A seeded sample
    where there are enough answers, else every answer as many whole times as fit and a seeded
    sample of them for the rest."""
    n = min(pairs, len(answers)) if share is None else round(trained * share / (1 - share))
    if n <= len(answers):
        return random.Random(seed).sample(answers, n)
    whole, rest = divmod(n, len(answers))
    return answers * whole + random.Random(seed).sample(answers, rest)


def fragment_texts(fragments: list[str], weight: float, seed: int) -> list[dict]:
    """The fragments as plain-text training records: each int(weight) times, and a seeded share
    (weight's fractional part) of them once more, in fragment order."""
    whole, part = int(weight), weight - int(weight)
    extra = set(random.Random(seed).sample(range(len(fragments)), round(len(fragments) * part)))
    return [{"text": f} for i, f in enumerate(fragments) for _ in range(whole + (i in extra))]
