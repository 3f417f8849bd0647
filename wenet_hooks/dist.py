"""Rank helpers that also work in one process without torch.distributed, and the
all-rank vote that keeps every rank raising (or going on) together."""

from __future__ import annotations

import atexit
import gc
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
    phase: str = ""  # what that rank was doing, where the caller cannot tell (e.g. "writing exp/step_3.pt")

    @classmethod
    def from_exception(cls, error: BaseException, phase: str = "") -> Failure:
        frames = traceback.format_tb(error.__traceback__)[-_TRACEBACK_FRAMES:]
        summary = "".join(frames) + f"{type(error).__name__}: {error_text(error)}\n"
        return cls(get_rank(), error_text(error), summary, phase)


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
_release_registered = False


def background_group() -> object:
    """Collective the first time in a process group: a gloo group of every rank, for the collectives
    a background thread runs while training goes on.

    It has its own communicator, so its collectives never interleave with
    training's on the default group (NCCL or gloo); gloo moves host memory,
    which is where a background gather's snapshot lies. It is destroyed at
    exit (:func:`release_background_group`).
    """
    global _background, _release_registered
    if _background is None or _background[0] is not dist.group.WORLD:
        _background = (dist.group.WORLD, dist.new_group(backend="gloo"))
        if not _release_registered:  # at the first group, not at import
            atexit.register(release_background_group)
            _release_registered = True
    return _background[1]


def release_background_group() -> None:
    """Destroy the package's gloo group and drop every reference to it, while the interpreter is whole.

    Kept alive into the interpreter's finalization (after WeNet's own
    ``destroy_process_group()``, which forgets the group but cannot free it
    while this module holds it, or after a save failed and the process ends
    without it), gloo's worker threads free the tensors of their last work
    there, need the GIL that is being torn down, and the process aborts
    ("terminate called without an active exception") after its work is done.
    Python has joined the writer thread before atexit handlers run.
    """
    global _background
    if _background is None:
        return
    world, group = _background
    _background = None
    if is_distributed() and dist.group.WORLD is world:
        try:
            dist.destroy_process_group(group)
        except Exception:  # already gone with the default group: dropping it below is enough
            logging.getLogger(__name__).debug("destroying the background group", exc_info=True)
    del world, group
    gc.collect()
