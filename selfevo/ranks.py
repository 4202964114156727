"""Several processes (ranks) working as one: each takes a share of a stage's batch plan, and the
shares come back in input order. Only Lightning's own collectives are used: a strategy's
`broadcast`, `global_rank` and `world_size` (a Trainer's `trainer.strategy`, or the loop's Fabric
strategy); with one device they cost nothing.

Every rank runs the same command: Lightning's launcher starts ranks 1..N-1 by running it again,
torchrun and SLURM start them all (docs/scaling.md).
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from lightning.fabric import Fabric
from lightning.fabric.strategies import Strategy as FabricStrategy
from lightning.pytorch.strategies import Strategy as TrainerStrategy

from selfevo.config import TrainerConfig

T = TypeVar("T")
V = TypeVar("V")
Strategy = FabricStrategy | TrainerStrategy


def launch_ranks(cfg: TrainerConfig) -> FabricStrategy:
    """Start the other ranks (when Lightning is the launcher) and join the process group; returns
    the strategy whose collectives the loop uses outside Lightning's stages. The Trainers made
    later find the group and the ranks already there, and start nothing more."""
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
    )
    fabric.launch()
    return fabric.strategy


def share(items: list[T], strategy: Strategy | None) -> list[T]:
    """This rank's share of a plan (all of it without a strategy): every world_size-th item from its
    rank. With a plan sorted longest first, every rank gets long and short work alike."""
    if strategy is None:
        return items
    return items[strategy.global_rank :: strategy.world_size]


def gather_in_order(
    mine: dict[int, V], count: int, strategy: Strategy | None, what: str
) -> list[V]:
    """Results 0..count-1 from every rank's {index: result}, on every rank (each rank broadcasts
    its share in turn)."""
    merged: dict[int, V] = {}
    for rank in range(1 if strategy is None else strategy.world_size):
        merged.update(mine if strategy is None else strategy.broadcast(mine, src=rank))
    missing = [i for i in range(count) if i not in merged]
    if missing:
        # Each rank halves its own batch after running out of memory; then the shares no longer
        # tile the plan.
        raise RuntimeError(
            f"{what}: no result for item {missing[0]} (the ranks ran with different batch sizes "
            "after running out of memory; lower the batch size)"
        )
    return [merged[i] for i in range(count)]


def on_rank_zero(strategy: Strategy | None, make: Callable[[], T]) -> T:
    """make() on global rank 0 only (what writes or reads run files), its result handed to every
    rank; without a strategy (one process, or work before the ranks start), just make().

    An error it raises is rank 0's to report: rank 0 raises it, and the other ranks exit quietly
    with code 0, so that the command's exit code and one-line message are rank 0's (Lightning's
    launcher kills rank 0 when another rank fails first). A KeyboardInterrupt or SystemExit on rank
    0 is handed on the same way, so that no rank is left waiting in the broadcast.
    """
    if strategy is None:
        return make()
    outcome: tuple[T | None, BaseException | None] = (None, None)
    if strategy.global_rank == 0:
        try:
            outcome = (make(), None)
        except BaseException as e:
            outcome = (None, e)
    result, error = strategy.broadcast(outcome, src=0)
    if error is not None:
        if strategy.global_rank != 0:
            sys.exit(0)
        raise error
    return result  # type: ignore[return-value]
