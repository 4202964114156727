"""Stage 3: choose the replay set from earlier generations' QA pairs, by IFD."""

from __future__ import annotations

import math
import random
from typing import Literal

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
