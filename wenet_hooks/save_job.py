"""What remains of one save once every rank has prepared it: the gathers, then rank 0's files.

It runs in the calling thread (``model_only``, WeNet's last save, no writer)
or in the background while training goes on (:mod:`wenet_hooks.background`):
then each rank first copies its partitions to host memory and checks them
(:mod:`wenet_hooks.gather.staging`; the next optimizer step waits for that
copy), and sends from the copies, over the package's own gloo group. Rank 0
lays each file out beforehand from shapes alone and writes every fragment it
receives to its place as it arrives
(:class:`wenet_hooks.file.publish.PendingFile`): it holds its receive buffer,
one bucket, never the model nor even a whole parameter. The files are
committed as a whole (:mod:`wenet_hooks.file.commit`) only once every rank
said its part arrived; a rank that failed sent zeros.

The steps, in order (:meth:`SaveJob.__call__`): ``stage`` (copies taken,
the check voted) -> ``gather`` (weights, then optimizer state) -> ``vote``
(every part arrived?) -> ``commit`` (rank 0: sealed, renamed, record last).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from wenet_hooks.dist import Failure, all_ok, first_failure, get_rank, is_rank0
from wenet_hooks.errors import ConsolidationError, PhaseError
from wenet_hooks.file.commit import Commit, fingerprint
from wenet_hooks.file.optimizer_file import legacy_optimizer_path, optimizer_path
from wenet_hooks.file.publish import PendingFile
from wenet_hooks.file.writer import Entry
from wenet_hooks.gather import PendingWeights
from wenet_hooks.gather.optimizer import PendingOptimizer
from wenet_hooks.gather.staging import Staging

logger = logging.getLogger(__name__)

GATHERING_WEIGHTS = "gathering the weights"
GATHERING_OPTIMIZER = "gathering the optimizer state"
STAGING = "copying and checking the masters"


@dataclass
class SaveJob:
    """Collective (over ``group``, the default group if None): finish one save's gathers; rank 0 writes.

    Raises (on the rank where it happened):
        PhaseError: naming the phase, with the original error as ``cause``.
    """

    path: Path
    weights: PendingWeights
    optimizer: Optional[PendingOptimizer]
    group: Any
    verify: bool
    on_written: Optional[Callable[[], None]]
    staging: Optional[Staging] = None  # the host copies the gathers send, and the check that reads them
    record: Optional[Mapping[str, Any]] = None  # written as <tag>.yaml with the save's record, last; taken at the call

    @property
    def what(self) -> str:
        """What the job gathers, for messages."""
        return "the weights and the optimizer state" if self.optimizer is not None else "the weights"

    def __call__(self) -> None:
        """The save's remaining steps, in order: stage -> gather -> vote -> commit (rank 0)."""
        try:
            self.stage()
            weights_file, optimizer_file, failure = self.gather()
            sent, failure = self.vote(failure)
            committed = self.commit(weights_file, optimizer_file, sent) if is_rank0() else None
        finally:
            if self.staging is not None:
                self.staging.release()
        first = failure or committed
        if first is not None:
            raise first

    def stage(self) -> None:
        """Collective: the host copies taken here if the save left them to this job (the next step waits
        for them), then every rank's check of its masters, voted on: nothing is gathered from a wrong read."""
        if self.staging is None:
            return
        if not self.staging.done.is_set():
            self.staging.run()
        mine = None
        if self.staging.error is not None:
            mine = Failure.from_exception(self.staging.error)
        elif self.staging.problem() is not None:
            mine = Failure(get_rank(), self.staging.problem())
        failure = first_failure(mine, self.group)
        if failure is not None:
            raise PhaseError(STAGING, ConsolidationError(failure.message))

    def gather(self) -> tuple[Optional[PendingFile], Optional[PendingFile], Optional[PhaseError]]:
        """Collective: the weights, then the optimizer state, each written into its file on rank 0 as it
        arrives (the weights sealed in between, so the optimizer file's meta names them); this rank's
        first failure (every rank runs every collective whatever failed)."""
        weights_file, failure = self._gather(self.path, lambda: self.weights.entries, self.weights.finish,
                                             GATHERING_WEIGHTS)
        optimizer_file = None
        if self.optimizer is not None:
            if weights_file is not None and failure is None:
                failure = self._seal_weights(weights_file)
            optimizer_file, optimizer_failure = self._gather(
                optimizer_path(self.path), self.optimizer.entries, self.optimizer.finish, GATHERING_OPTIMIZER)
            failure = failure or optimizer_failure
        return weights_file, optimizer_file, failure

    def vote(self, failure: Optional[PhaseError]) -> tuple[bool, Optional[PhaseError]]:
        """Collective: whether every rank's part arrived (a rank that failed sent zeros), before anything
        is published; and this rank's failure."""
        try:
            return all_ok(failure is None, f"sending {self.what}", self.group), failure
        except Exception as e:  # the group is gone (destroyed before the job ran): nothing is published
            return False, failure or PhaseError(GATHERING_WEIGHTS, e)

    def _seal_weights(self, weights_file: PendingFile) -> Optional[PhaseError]:
        """Rank 0, between the two gathers: the weights sealed, so the optimizer file's meta can name them
        (a resume refuses an optimizer file beside weights of another save)."""
        assert self.optimizer is not None
        try:
            weights_file.seal()
            self.optimizer.meta["weights"] = fingerprint(weights_file.tmp)  # the save's id
        except Exception as e:  # rank 0 still takes its part in the optimizer's gather
            return PhaseError(f"writing {self.path}", e)
        return None

    def commit(self, weights_file: Optional[PendingFile], optimizer_file: Optional[PendingFile],
               sent: bool) -> Optional[PhaseError]:
        """Rank 0: the save's files committed as a whole (:mod:`wenet_hooks.file.commit`), or none of them."""
        commit = Commit(weights_file, optimizer_file, self.record) if weights_file is not None else None
        whole = commit is not None and sent and (self.optimizer is None or optimizer_file is not None)
        if not whole:
            for f in (weights_file, optimizer_file):
                if f is not None:
                    f.discard()
            return None
        try:
            commit.commit()
        except Exception as e:
            commit.discard()
            return PhaseError(f"writing {self.path}", e)
        if self.optimizer is None:
            _remove_stale(optimizer_path(self.path))  # the optimizer file of an earlier save of this tag
        _remove_stale(legacy_optimizer_path(self.path))
        if self.on_written is not None:
            self.on_written()
        return None

    def _gather(self, path: Path, entries: Callable[[], list[Entry]], finish: Callable[..., Any],
                phase: str) -> tuple[Optional[PendingFile], Optional[PhaseError]]:
        """Collective: one gather; on rank 0 into ``path.tmp`` as the tensors complete."""
        file, failure = None, None
        if is_rank0():
            try:
                file = PendingFile(path, entries(), verify=self.verify)
            except Exception as e:  # rank 0 still takes its part in the gather below
                failure = PhaseError(f"writing {path}", e)
        # Rank 0 hands each tensor or fragment to the file as it arrives; a file that could not be opened
        # drops them (the gather's collectives still go on to their end on every rank).
        write, write_part = (file.receive, file.receive_part) if file is not None else (_drop, _drop)
        try:
            if is_rank0():
                finish(write, write_part)
            else:
                finish(None, None)
        except Exception as e:
            failure = failure or PhaseError(phase, e)
        if file is not None and file.error is not None:
            failure = failure or PhaseError(f"writing {path}", file.error)
        return file, failure


def _drop(*_: Any) -> None:
    """Rank 0's end of a gather whose file could not be opened (the failure is reported after it)."""


def _remove_stale(optim: Path) -> None:
    """An older save's optimizer file of this tag: it does not belong to the weights just written,
    and a resume would pair them."""
    if optim.is_file():
        optim.unlink()
        logger.info("wenet_hooks: removed %s, which belonged to an earlier save of the same tag", optim)
