"""Writing the previous save on rank 0 while training goes on.

One job at a time: a new job (the next save) first waits for the previous one,
so at most one CPU copy of the model waits to be written. The thread is not a
daemon: the interpreter waits for the last write before it exits.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from wenet_hooks.errors import describe

logger = logging.getLogger(__name__)


class BackgroundWriter:
    """Runs write jobs in one background thread and keeps the first failure."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None

    def submit(self, job: Callable[[], None], description: str) -> None:
        """Start ``job`` after the previous one has finished (its error is kept for ``wait``)."""
        self._join()
        self._thread = threading.Thread(target=self._run, args=(job, description), name="wenet_hooks-writer")
        self._thread.start()

    def wait(self) -> Optional[str]:
        """Wait for the job in flight; the error of a failed job since the last call, or None."""
        self._join()
        error, self._error = self._error, None
        return error

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, job: Callable[[], None], description: str) -> None:
        try:
            job()
        except Exception as e:  # reported to every rank at the next save
            logger.exception("wenet_hooks: %s failed in the background", description)
            self._error = f"{description}: {describe(e)}"
