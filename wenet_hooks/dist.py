"""Rank helpers that also work in a single process without torch.distributed."""

from __future__ import annotations

import logging
from typing import Optional

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


def first_error(error: Optional[str]) -> Optional[tuple[int, str]]:
    """Collective: every rank learns the first ``(rank, message)`` any rank reported.

    Each rank passes ``None`` when its part of a phase succeeded. All ranks get
    the same answer, so they raise together or continue together instead of
    one rank raising while the others wait in the next collective.
    """
    if get_world_size() == 1:
        return (0, error) if error is not None else None
    reports: list[Optional[str]] = [None] * get_world_size()
    dist.all_gather_object(reports, error)
    for rank, report in enumerate(reports):
        if report is not None:
            return rank, report
    return None
