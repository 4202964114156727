"""The hardware a stage runs on: the device and dtype, a Lightning Trainer for the config's devices,
and a smaller batch when the GPU runs out of memory."""

from __future__ import annotations

import logging
from typing import Callable, Optional, TypeVar

import lightning as L
import torch

from selfevo.config import TrainerConfig

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return (
            torch.bfloat16
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else torch.float32
        )
    return getattr(torch, dtype)


def accelerator_device(accelerator: str = "auto") -> torch.device:
    """Where work outside a Lightning Trainer (generation) runs: the GPU when there is one and it
    is allowed."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


T = TypeVar("T")


def halving_batch_on_oom(run: Callable[[int], T], batch_size: int, what: str) -> T:
    """run(batch_size), retried with half the batch after each CUDA out-of-memory error.

    Callers order their work longest first, so an out-of-memory error comes at the start, before
    much is lost to the retry.
    """
    while True:
        try:
            return run(batch_size)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("out of GPU memory in %s: retrying with batch size %d", what, batch_size)


def bf16_is_native(accelerator: str = "auto") -> bool:
    """Whether bf16 arithmetic runs in hardware where `accelerator` trains: a GPU of compute
    capability 8.0 or more (not a T4 or V100, which emulate it), or a CPU with AVX512-BF16 or AMX.
    Other CPUs emulate it, far slower than fp32 (docs/tuning.md)."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = torch.cpu
    return any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def training_precision(cfg: TrainerConfig) -> Optional[str]:
    """The training stage's Lightning precision: trainer.fit_precision, resolved (auto: bf16-mixed
    where bf16 is native, else 32-true), or trainer.precision when it is not set."""
    if cfg.fit_precision == "auto":
        return "bf16-mixed" if bf16_is_native(cfg.accelerator) else "32-true"
    return cfg.fit_precision or cfg.precision


def build_trainer(cfg: TrainerConfig, **kwargs) -> L.Trainer:
    """A Lightning Trainer from the config's hardware settings plus stage-specific arguments."""
    precision = cfg.precision
    if precision is None:
        precision = (
            "bf16-mixed"
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else "32-true"
        )
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("logger", False)
    # Each stage deals its batch plan out to the ranks itself (PlannedBatches, SequenceBatches,
    # evaluation batches), so that a batch is the same on any number of ranks.
    kwargs.setdefault("use_distributed_sampler", False)
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=precision,
        **kwargs,
    )
