"""Typed exceptions. Each carries the file, key or rank it is about, so a
caller (the WeNet hook, the offline command) can report it without parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


class WenetHooksError(Exception):
    """Base class of every error this package raises on purpose."""


class ConsolidationError(WenetHooksError):
    """Gathering the full state dict from a DeepSpeed engine failed."""


class CheckpointWriteError(WenetHooksError):
    """Writing ``path`` failed; nothing was published at ``path``."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"could not write {self.path}: {reason}")


class VerificationError(WenetHooksError):
    """A written checkpoint does not hold what was expected.

    ``problems`` lists every difference found, one line each, so a user sees
    the whole picture at once instead of fixing one key per run.
    """

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        super().__init__(f"{self.path} failed verification ({len(self.problems)} problem(s)):\n"
                         + _listing(self.problems))


class ConfigError(WenetHooksError):
    """The ``wenet_hooks`` configuration is invalid; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"invalid wenet_hooks configuration ({len(self.problems)} problem(s)):\n"
                         + _listing(self.problems))


class SaveError(WenetHooksError):
    """A save failed on some rank; every rank raises it together.

    On the other ranks, ``remote_traceback`` is where the failing rank raised
    (its last frames), so any rank's log tells what happened; the failing rank
    logged its own traceback.
    """

    def __init__(self, tag: str, rank: int, phase: str, reason: str, remote_traceback: str = "") -> None:
        self.tag, self.rank, self.phase, self.reason = tag, rank, phase, reason
        self.remote_traceback = remote_traceback
        self.origin: object = None  # the failing rank's report (wenet_hooks.dist.Failure), shared again by a later vote
        message = f"save '{tag}' failed on rank {rank} while {phase}: {reason}"
        if remote_traceback:
            message += f"\n  where rank {rank} raised it:\n" + remote_traceback.rstrip()
        super().__init__(message)


class CheckpointReadError(WenetHooksError):
    """An existing checkpoint cannot be read or is inconsistent; names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class FirstError:
    """The one record of a failure on this rank: where a part of a collective step (a gather, its host
    copies, the file it writes into) records what failed and goes on, since every rank must still reach
    the step's vote. The first failure is kept, with what was being done; what follows from it is dropped."""

    def __init__(self) -> None:
        self.what = ""
        self.error: Optional[BaseException] = None

    def record(self, what: str, error: BaseException) -> None:
        if self.error is None:
            self.what, self.error = what, error

    def __bool__(self) -> bool:
        return self.error is not None


def error_text(error: BaseException) -> str:
    """The error's message, never empty (``StopIteration()`` says nothing)."""
    return str(error).strip() or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first line of :func:`error_text`, for a table cell or a one-line log."""
    return error_text(error).splitlines()[0]


def _listing(problems: Sequence[str]) -> str:
    return "\n".join(f"  - {p}" for p in problems)


class RestoreError(WenetHooksError):
    """A resume from ``<tag>.pt`` + ``<tag>.optim`` was refused before anything changed."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        super().__init__(f"cannot resume from {self.path} ({len(self.problems)} problem(s)); nothing was "
                         "restored:\n" + _listing(self.problems))


class PhaseError(WenetHooksError):
    """One rank's failure during a save, with the phase it happened in (``phase``, e.g. "writing
    exp/step_3.pt") and the original error (``cause``): the message every rank's SaveError carries."""

    def __init__(self, phase: str, cause: BaseException) -> None:
        super().__init__(error_text(cause))
        self.phase, self.cause = phase, cause


class ResumeChoiceError(WenetHooksError):
    """``resume: auto`` found a different newest committed save on different ranks."""

    def __init__(self, model_dir: Path, choices: Sequence[object]) -> None:
        self.model_dir, self.choices = Path(model_dir), list(choices)
        found = ", ".join(f"rank {r}: {c or 'none'}" for r, c in enumerate(self.choices))
        super().__init__(f"resume: auto: the ranks see different saves in {self.model_dir} ({found}); HINT: model_dir "
                         "must be one folder that every node shares, or resume by hand with --checkpoint")
