"""Fault injection for the crash tests: `SELFEVO_KILL_AT=POINT:N` makes the process SIGKILL itself
at the N-th pass of POINT (counted from the start of the process). Without the variable it does
nothing.

The points, where the code calls `kill_point`:
    stage     after a stage's files are written, before the next stage starts
    write     inside an atomic write, after half of the bytes are on disk in the temporary file
    generate  after each batch of question or answer generation
    train     after each training micro-batch (and after a checkpoint, when one is due)
    score     after each batch of IFD scoring
    evaluate  after each batch of evaluation
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = ("stage", "write", "generate", "train", "score", "evaluate")
_passes: Counter[str] = Counter()


def kill_point(point: str) -> None:
    """SIGKILL this process if SELFEVO_KILL_AT names this point and this is its N-th pass."""
    spec = os.environ.get("SELFEVO_KILL_AT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _passes[point] += 1
    if _passes[point] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
