"""Rank helpers that also work in one process without torch.distributed, and the
all-rank vote that keeps every rank raising (or going on) together."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Optional, TypeVar

import torch.distributed as dist

from wenet_hooks.errors import error_text

# Frames of a failing rank's traceback that travel to the other ranks.
_TRACEBACK_FRAMES = 4


def is_distributed() -> bool:
    """Whether torch.distributed is available and initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when torch.distributed is not initialised."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """World size, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    """True on the rank that writes files (global rank 0, whatever the node)."""
    return get_rank() == 0


def log_rank0(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """Log on rank 0 only, so an N-GPU job prints each line once, not N times."""
    if is_rank0():
        logger.log(level, msg, *args)


@dataclass(frozen=True)
class Failure:
    """What one rank reports when its part of a phase failed."""

    rank: int
    message: str
    traceback: str = ""  # the last frames, where it was raised

    @classmethod
    def from_exception(cls, error: BaseException) -> Failure:
        frames = traceback.format_tb(error.__traceback__)[-_TRACEBACK_FRAMES:]
        summary = "".join(frames) + f"{type(error).__name__}: {error_text(error)}\n"
        return cls(get_rank(), error_text(error), summary)


Report = TypeVar("Report")


def all_reports(mine: Report, group: object = None) -> list[Report]:
    """Collective (over ``group`` of every rank, the default group if None): every rank's ``mine``, in rank order."""
    if not is_distributed() or get_world_size() == 1:
        return [mine]
    reports: list[Report] = [None] * get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(reports, mine, group=group)
    return reports


def first_failure(mine: Optional[Report], group: object = None) -> Optional[Report]:
    """Collective: every rank learns the first failure any rank reported (lowest rank).

    Each rank passes ``None`` when its part of a phase succeeded, else a
    picklable report (a :class:`Failure`). All ranks get the same answer, so
    they raise together or go on together instead of one rank raising while
    the others wait in the next collective.
    """
    return next((r for r in all_reports(mine, group) if r is not None), None)


def all_ok(ok: bool, what: str, group: object = None) -> bool:
    """Collective: whether every rank says ``ok`` (``what`` names the step in a failure)."""
    return first_failure(None if ok else Failure(get_rank(), f"{what} failed"), group) is None


# (the default group it was made in, the gloo group of every rank)
_background: Optional[tuple[object, object]] = None


def background_group() -> object:
    """Collective the first time in a process group: a gloo group of every rank, for the collectives
    a background thread runs while training goes on.

    It has its own communicator, so its collectives never interleave with
    training's on the default group (NCCL or gloo); gloo moves host memory,
    which is where a background gather's snapshot lies.
    """
    global _background
    if _background is None or _background[0] is not dist.group.WORLD:
        _background = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _background[1]
