"""The previous save's remaining work, done while training goes on.

On rank 0: writing and verifying the files. On every rank, with the optimizer
file: sending its copy of the optimizer state to rank 0 (a collective over a
group of its own, :func:`wenet_hooks.dist.background_group`).

One job at a time: a new job (the next save) first waits for the previous one,
so at most one save's CPU copy (the model, and with the optimizer file about
three times that) is in flight. The thread is not a daemon: the interpreter
waits for the last job before it exits.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from wenet_hooks.dist import Failure
from wenet_hooks.errors import SaveError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailedWrite:
    """A background write that failed: the save it belonged to, and why."""

    tag: str
    what: str  # e.g. "writing exp/step_3.pt"
    failure: Failure


class BackgroundWriter:
    """Runs write jobs in one background thread and keeps the first failure."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._failed: Optional[FailedWrite] = None

    def submit(self, job: Callable[[], None], tag: str, what: str) -> None:
        """Start ``job`` after the previous one has finished (its failure is kept for ``wait``)."""
        self._join()
        self._thread = threading.Thread(target=self._run, args=(job, tag, what), name="wenet_hooks-writer")
        self._thread.start()

    def wait(self) -> Optional[FailedWrite]:
        """Wait for the job in flight; the first failed job since the last call, or None."""
        self._join()
        failed, self._failed = self._failed, None
        return failed

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, job: Callable[[], None], tag: str, what: str) -> None:
        try:
            job()
        except Exception as e:  # reported to every rank at the next save
            if isinstance(e, SaveError):  # voted on already: the failing rank logged where it raised
                logger.error("wenet_hooks: %s failed in the background (rank %d: %s)", what, e.rank, e.reason)
            else:
                logger.exception("wenet_hooks: %s failed in the background", what)
            if self._failed is None:
                self._failed = FailedWrite(tag, what, Failure.from_exception(e))
