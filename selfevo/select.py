"""What is kept: the questions worth answering, the dev split, and the replay set from earlier
generations' QA pairs, by IFD."""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter
from typing import Literal

from selfevo.prompts import Language

# Words that name nothing: a question made of these and the domain's everyday words asks about no
# fact in particular ("What is the answer to this question?").
_STOPWORDS = frozenset(
    """a about above after all also an and any are as at be been before being between both but by
    can could did do does doing during each few for from had has have having how if in into is it
    its may might more most must no not of on once only or other our out over own same should so
    some such than that the their them then there these they this those through to too under until
    up very was were what when where which while who whom why will with would you your
    product topic passage text document question answer sentence""".split()
)
_WORD = re.compile(r"[a-z0-9_]+(?:[.\-/][a-z0-9_]+)*")
_HAN = re.compile(r"[\u3400-\u9fff]+")


def terms(text: str, language: Language) -> set[str]:
    """The words of a text that may name something: Latin words (case-folded, not stop words, 3 or
    more characters, or any with a digit) and, in Chinese, each pair of adjacent Han characters."""
    text = unicodedata.normalize("NFKC", text).casefold()
    found = {
        w
        for w in _WORD.findall(text)
        if w not in _STOPWORDS and (len(w) >= 3 or any(c.isdigit() for c in w))
    }
    if language == "zh":
        found |= {run[i : i + 2] for run in _HAN.findall(text) for i in range(len(run) - 1)}
    return found


def normalised_question(question: str) -> str:
    """The form in which two questions are the same: NFKC, case-folded, letters and digits only."""
    text = unicodedata.normalize("NFKC", question).casefold()
    return "".join(c for c in text if c.isalnum())


def filter_questions(
    records: list[dict], fragments: list[str], asked_before: set[str], language: Language
) -> tuple[list[dict], dict]:
    """The questions worth answering, and how many were dropped and why:

    - "unspecific": it shares with its fragment no term (`terms`) that fewer than half of all
      fragments hold: it names nothing particular to its fragment;
    - "recurring": the same question (`normalised_question`) was written for two or more fragments;
    - "asked_before": an earlier generation or the dev split asked it, or it repeats a question
      kept for the same fragment this generation.
    """
    fragment_terms = [terms(f, language) for f in fragments]
    frequency = Counter(t for ts in fragment_terms for t in ts)
    common = len(fragments) / 2 if len(fragments) >= 4 else len(fragments) + 1
    forms = [normalised_question(r["question"]) for r in records]
    fragments_of: dict[str, set[int]] = {}
    for r, form in zip(records, forms):
        fragments_of.setdefault(form, set()).add(r["id"])
    seen = set(asked_before)
    kept: list[dict] = []
    drops = Counter()
    for r, form in zip(records, forms):
        shared = terms(r["question"], language) & fragment_terms[r["id"]]
        if not any(frequency[t] < common for t in shared):
            drops["unspecific"] += 1
        elif len(fragments_of[form]) > 1:
            drops["recurring"] += 1
        elif form in seen:
            drops["asked_before"] += 1
        else:
            seen.add(form)
            kept.append(r)
    return kept, {k: drops[k] for k in ("unspecific", "recurring", "asked_before")}


def split_dev(pairs: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, dev): a seeded `share` of the pairs held back as the dev split (at least one pair
    when share > 0 and there are two or more), both in their input order."""
    if share <= 0 or len(pairs) < 2:
        return list(pairs), []
    n = min(len(pairs) - 1, max(1, round(len(pairs) * share)))
    held = set(random.Random(seed).sample(range(len(pairs)), n))
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


def fragment_texts(fragments: list[str], weight: float, seed: int) -> list[dict]:
    """The fragments as plain-text training records: each int(weight) times, and a seeded share
    (weight's fractional part) of them once more, in fragment order."""
    whole, part = int(weight), weight - int(weight)
    extra = set(random.Random(seed).sample(range(len(fragments)), round(len(fragments) * part)))
    return [{"text": f} for i, f in enumerate(fragments) for _ in range(whole + (i in extra))]
