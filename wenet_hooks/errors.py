"""Typed exceptions. Each carries the file, key or rank it is about, so a
caller (the WeNet hook, the offline command) can report it without parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


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
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{self.path} failed verification ({len(self.problems)} problem(s)):\n{listing}"
        )


class ConfigError(WenetHooksError):
    """The ``wenet_hooks`` configuration is invalid; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid wenet_hooks configuration ({len(self.problems)} problem(s)):\n{listing}")


class SaveError(WenetHooksError):
    """A save failed on some rank; every rank raises it together."""

    def __init__(self, tag: str, rank: int, phase: str, reason: str) -> None:
        self.tag, self.rank, self.phase, self.reason = tag, rank, phase, reason
        super().__init__(f"save '{tag}' failed on rank {rank} while {phase}: {reason}")


class CheckpointReadError(WenetHooksError):
    """An existing checkpoint cannot be read or is inconsistent; names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def describe(error: BaseException) -> str:
    """A one-line-or-more message that is never empty (``StopIteration()`` says nothing)."""
    return str(error) or type(error).__name__
