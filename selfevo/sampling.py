"""How text is sampled, and every seed the run derives from its one `seed`.

A run reproduces from `seed` alone: each generation, each batch and each epoch gets its own seed,
derived here and nowhere else, so that the same work draws the same numbers on any backend, after
any resume and on any number of ranks (a batch's seed is its number in the whole plan).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut


def prompt_limit(sampling: Sampling, max_length: int) -> int:
    """Prompt tokens that fit before the new tokens within max_length (never fewer than 8)."""
    return max(8, max_length - sampling.max_new_tokens)


def warn_if_cut(lengths: list[int], limit: int) -> None:
    """Say how many prompts are longer than `limit` tokens: they lose their start, never the
    request."""
    cut = sum(n > limit for n in lengths)
    if cut:
        log.warning(
            "%d of %d prompts exceed %d tokens (model.max_length minus the new tokens) and were "
            "cut from the left",
            cut,
            len(lengths),
            limit,
        )


def generation_seed(run_seed: int, generation: int) -> int:
    """The seed of generation i's questions, replay and training."""
    return run_seed * 1000 + generation


def answers_seed(generation_seed: int) -> int:
    """The answers' seed: not the questions', so that the two draws differ."""
    return generation_seed + 1


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch b of a stage's plan."""
    return seed * 100_003 + batch


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of a training epoch's shuffle."""
    return seed * 1_000_003 + epoch
