"""Rank helpers that also work in one process without torch.distributed, and the
one way a failure is shared: a collective step returns on every rank, or raises
the same error on every rank (:func:`collective_step`, over :func:`first_failure`)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import traceback
from dataclasses import dataclass
from typing import Iterator, Optional, TypeVar

import torch.distributed as dist

from wenet_hooks.errors import PhaseError, SaveError, error_text

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
        """This rank's report of ``error``: a :class:`PhaseError` brings its phase and cause; a
        :class:`SaveError` (voted already) the failing rank's own report."""
        if isinstance(error, SaveError) and isinstance(error.origin, Failure):
            return error.origin
        if isinstance(error, PhaseError):
            error, phase = error.cause, error.phase
        return cls(get_rank(), error_text(error), _summary(error), phase)

    def error(self, tag: str, phase: str = "") -> SaveError:
        """The :class:`SaveError` every rank raises for this failure (``phase``: else the failing rank's)."""
        # The failing rank logged its own traceback; the others carry its summary.
        remote = self.traceback if self.rank != get_rank() else ""
        error = SaveError(tag, self.rank, phase or self.phase, self.message, remote)
        error.origin = self
        return error


def _summary(error: BaseException) -> str:
    frames = traceback.format_tb(error.__traceback__)[-_TRACEBACK_FRAMES:]
    return "".join(frames) + f"{type(error).__name__}: {error_text(error)}\n"


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


@contextlib.contextmanager
def collective_step(tag: str, phase: str, group: object = None) -> Iterator[None]:
    """Collective (over ``group``, the default group if None): one step of save ``tag``::

        with collective_step(tag, "gathering the weights", group):
            ...  # this rank's part

    The body runs here, then the ranks share their outcome in one vote: every
    rank goes on, or every rank raises the same :class:`SaveError`, the lowest
    failing rank's (``phase``, or the phase a :class:`PhaseError` names). The
    one failure protocol of a save, on the training thread and in the
    background alike.
    """
    mine = None
    try:
        yield
    except Exception as e:  # shared with the other ranks below, then raised on every one
        logging.getLogger(__name__).exception("wenet_hooks: save '%s' failed here", tag)
        mine = Failure.from_exception(e, phase)
    failure = first_failure(mine, group)
    if failure is not None:
        raise failure.error(tag, failure.phase or phase)


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
