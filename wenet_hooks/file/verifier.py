"""A background save's verification in a helper process, off the training process's GIL.

Verifying a written file (:func:`wenet_hooks.file.verify.verify`) loads it as
WeNet does, with ``torch.load(weights_only=True, mmap=True)``, and checksums
every tensor. The loading is Python (the weights_only unpickler): run by a
background save's thread, it made three quarters of that thread's calls into
C, and each call takes the GIL back from the training thread, which then
waits for it (bench/README.md, table 10). So rank 0 starts one helper process
at its first background save, keeps it, and hands it each sealed file by
name; the training process only waits on a pipe. The helper runs the same
function on the same bytes: it proves what the verification in this process
proves, from a process that shares nothing with the writer but the file.

The protocol is one json line each way per file: ``{"path": ..., "manifest":
Manifest.to_plain()}`` in, ``{"problems": [...]}`` out (none: the file is
right), or ``{"error": "..."}`` where the helper could not verify it. The
helper ends when its stdin closes: when this process ends, however it ends
(a SIGKILL too). Where the helper cannot start, ends, or cannot verify, the
file is verified in this process instead, with a warning: the promise is
kept either way.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Union

from wenet_hooks.errors import VerificationError
from wenet_hooks.file.manifest import Manifest
from wenet_hooks.file.verify import verify

logger = logging.getLogger(__name__)

# The package's folder's parent, first on the helper's path: it runs this very code, even where the training
# process found the package through a path of its own.
_ROOT = str(Path(__file__).resolve().parents[2])
_SERVE = f"import sys; sys.path.insert(0, {_ROOT!r}); from wenet_hooks.file.verifier import serve; serve()"
HELPER_COMMAND = (sys.executable, "-c", _SERVE)


class Verifier:
    """One helper process, started on first use and again after it ended; :meth:`verify` is thread-safe."""

    def __init__(self, command: tuple[str, ...] = HELPER_COMMAND) -> None:
        self.command = command  # the helper's command line: :func:`serve` in this interpreter
        self._process: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._close_at_exit = False  # close() registered for this process's exit (stdin closes then anyway)
        self._said_cannot_start = False  # that warning is given once, not at every file
        self.verified = 0  # files the helper verified (a fallback in this process is not counted)

    @property
    def pid(self) -> Optional[int]:
        """The helper's process id while it runs, else None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Start the helper now (it imports torch, ~1-2 s, while the save gathers), unless it runs."""
        with self._lock:
            self._running()

    def verify(self, path: Union[str, Path], expected: Manifest) -> None:
        """:func:`~wenet_hooks.file.verify.verify` of ``path``, in the helper (in this process where it cannot).

        Raises:
            VerificationError: listing every problem found, each naming its key.
        """
        with self._lock:
            problems = self._ask(Path(path), expected)
        if problems is None:
            verify(path, expected)
        elif problems:
            raise VerificationError(Path(path), problems)

    def close(self) -> None:
        """End the helper (its stdin closed: it exits once its last answer is written)."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            _end(process)

    def _running(self) -> Optional[subprocess.Popen]:
        process = self._process
        if process is not None and process.poll() is None:
            return process
        if process is not None:
            logger.warning("wenet_hooks: the verification helper (pid %d) had ended (exit code %s); starting "
                           "another", process.pid, process.returncode)
            self._process = None
        if not self.command[0]:  # embedded: no interpreter to start
            return None
        try:  # stderr shared with this process: the helper's warnings show where the user looks
            self._process = subprocess.Popen(list(self.command), stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                             errors="surrogateescape")
            if not self._close_at_exit:  # close() also waits for the helper's exit
                atexit.register(self.close)
                self._close_at_exit = True
        except OSError as e:
            if not self._said_cannot_start:
                self._said_cannot_start = True
                logger.warning("wenet_hooks: could not start the verification helper (%s); files are verified "
                               "in the training process", e)
        return self._process

    def _ask(self, path: Path, expected: Manifest) -> Optional[list[str]]:
        """The helper's problems with ``path``; None where it gave no answer (it is then ended)."""
        process = self._running()
        if process is None:
            return None
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps({"path": str(path), "manifest": expected.to_plain()}) + "\n")
            process.stdin.flush()
            answer = json.loads(process.stdout.readline() or "null")
        except (OSError, ValueError) as e:
            answer = {"error": f"no answer ({e})"}
        if not isinstance(answer, dict) or "problems" not in answer:
            why = answer.get("error") if isinstance(answer, dict) else "it ended"
            logger.warning("wenet_hooks: the verification helper (pid %d) did not verify %s: %s; verifying it "
                           "in the training process", process.pid, path, why)
            self._process = None
            _end(process)
            return None
        self.verified += 1
        return list(answer["problems"])


def _end(process: subprocess.Popen) -> None:
    try:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait()


def serve() -> None:
    """The helper's loop: one answer per request line, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the training process's to handle
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed goes to stderr, never into the answers
    for line in sys.stdin:
        answer: dict[str, Any]
        try:
            request = json.loads(line)
            verify(request["path"], Manifest.from_plain(request["manifest"]))
            answer = {"problems": []}
        except VerificationError as e:
            answer = {"problems": e.problems}
        except Exception as e:  # the training process verifies it itself
            answer = {"error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


_HELPER = Verifier()  # rank 0's, for every background save of the process


def helper() -> Verifier:
    """This process's verification helper (started by its first :meth:`Verifier.start` or verify)."""
    return _HELPER
