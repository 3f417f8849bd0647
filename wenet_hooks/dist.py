"""Rank helpers that also work in a single process without torch.distributed."""

from __future__ import annotations

import logging

import torch.distributed as dist


def get_rank() -> int:
    """Global rank, 0 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def get_world_size() -> int:
    """World size, 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_rank0() -> bool:
    """True on the rank that writes files."""
    return get_rank() == 0


def log_rank0(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """Log on rank 0 only, so an N-GPU job prints each line once, not N times."""
    if is_rank0():
        logger.log(level, msg, *args)
