"""One save, collectively: gather on every rank, write and verify on rank 0, commit.

This is the WeNet-free pipeline that the WeNet hook calls at each save; any
DeepSpeed trainer can call it after ``engine.save_checkpoint``::

    engine.save_checkpoint(model_dir, tag=tag)
    save_consolidated(engine, model_dir, tag)      # every rank; rank 0 writes <tag>.pt

One save is one :class:`Save`, whose methods are its steps, in the order they run:

=========  =============================================  ===================================
step       what                                           collective (group)
=========  =============================================  ===================================
plan       the engine read once, the plan agreed          1 exchange (default), at the call;
           (:func:`wenet_hooks.plan.plan_save`)           at an engine's first save 1 more and
                                                          the gloo group made
prepare    every gather allocated, host copies            1 vote (default), at the call
           registered
stage      each rank's host copies taken and checked      1 vote (the save's group); a
           against the training weights                   background save only
gather     the weights, then the optimizer state, each    the chunks (the save's group)
           fragment to its place in rank 0's ``.tmp``
vote       every rank's part arrived                      1 vote (the save's group)
commit     rank 0: files sealed, renamed, record last     1 vote (default); in the
           (:mod:`wenet_hooks.file.commit`)               background: the next save's
=========  =============================================  ===================================

With a writer, the steps after ``prepare`` run in the background while
training goes on, over the package's gloo group. Each vote is
:func:`~wenet_hooks.dist.collective_step`: it returns on every rank or raises
the same :class:`~wenet_hooks.errors.SaveError` on every rank. In a background
save, rank 0's commit is voted on at the next save or :func:`settle_background`
(the other ranks' jobs do not wait for rank 0's fsync and verification), and
so is any failure of the job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from wenet_hooks.background import BackgroundWriter
from wenet_hooks.dist import collective_step, first_failure, is_rank0
from wenet_hooks.errors import ConsolidationError, FirstError, PhaseError
from wenet_hooks.file.commit import commit as commit_files, fingerprint
from wenet_hooks.file.optimizer_file import legacy_optimizer_path
from wenet_hooks.file.publish import PendingFile, Verify
from wenet_hooks.file.verifier import helper
from wenet_hooks.file.verify import verify
from wenet_hooks.file.writer import Entry
from wenet_hooks.gather import DEFAULT_BUCKET_MB, PendingWeights, prepare_consolidate
from wenet_hooks.gather.optimizer import PendingOptimizer, prepare_optimizer
from wenet_hooks.plan import SaveOptions, SavePlan, plan_save

__all__ = ["Save", "SaveOptions", "save_consolidated", "settle_background"]

logger = logging.getLogger(__name__)

GATHERING_WEIGHTS = "gathering the weights"
GATHERING_OPTIMIZER = "gathering the optimizer state"
STAGING = "copying and checking the masters"


def save_consolidated(
    engine: Any,
    model_dir: Union[str, Path],
    tag: str,
    options: SaveOptions = SaveOptions(),
    *,
    writer: Optional[BackgroundWriter] = None,
    on_written: Optional[Callable[[], None]] = None,
    record: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Collective: must be called on all ranks. Write ``<model_dir>/<tag>.pt`` (and ``<tag>.optim``).

    Gathers the full state dict (:func:`wenet_hooks.consolidate`) and, with
    ``options.optimizer``, the optimizer state; rank 0 writes each tensor into
    its place in ``<tag>.pt.tmp`` as it arrives (it never holds the whole
    model), and, with ``options.verify``, reopens the file and checks every
    tensor before publishing it; then rank 0 calls ``on_written``. After each
    step the ranks share their outcome, so a failure anywhere raises on every
    rank. With a ``writer`` (and ``options.background_gather``), the copies of
    each rank's partitions, the check, the gathers and the writing go on in
    the background (the next optimizer step waits for this rank's copies);
    this returns at once and :func:`settle_background` reports the outcome.

    The files commit as a whole (:mod:`wenet_hooks.file.commit`): both are
    sealed (fsynced, verified) before either is renamed; with ``record`` (e.g.
    WeNet's ``info_dict``: a copy is taken now, before this returns), rank 0
    then writes it as ``<tag>.yaml`` with the files' fingerprints, renamed
    last, which marks the save committed.

    Returns:
        The path of the file (on every rank).

    Raises:
        SaveError: on every rank, naming the rank and step that failed, with
            the failing rank's message and where it raised.
    """
    background = writer is not None and options.background_gather
    save = Save(plan_save(engine, model_dir, tag, options, background=background, record=record), on_written)
    try:
        save.prepare()
        if background:
            assert writer is not None
            writer.submit(save, tag, f"gathering {save.plan.what} and writing {save.plan.path}")
    except BaseException:
        save.release()  # never run: the next step must not wait for its copies
        raise
    if not background:  # gathered and written before training goes on
        save()
    return save.plan.path


def settle_background(writer: BackgroundWriter) -> None:
    """Collective: wait for this rank's background job in flight; raise on every rank if one failed.

    Raises:
        SaveError: naming the save whose write failed (an earlier one).
    """
    failed = first_failure(writer.wait())
    if failed is not None:
        raise failed.failure.error(failed.tag, f"{failed.what} in the background")


class Save:
    """One save, from its plan to its commit; each method is one step (the module's table)."""

    def __init__(self, plan: SavePlan, on_written: Optional[Callable[[], None]] = None) -> None:
        self.plan, self.on_written = plan, on_written
        self.weights: Optional[PendingWeights] = None
        self.optimizer: Optional[PendingOptimizer] = None
        self.files: list[PendingFile] = []  # rank 0: the weights' file, then the optimizer's
        self.failure = FirstError()  # this rank's first failure in the gathers and their files: (phase, error)
        # A background save's files are verified in rank 0's helper process, off the training thread's GIL.
        self._verifier: Verify = verify
        if plan.group is not None and plan.options.verify and is_rank0():
            self._verifier = helper().verify

    def prepare(self) -> None:
        """Collective (default group, at the call): every gather allocated, the host copies registered
        (taken now where they cannot wait for the background); one vote."""
        with collective_step(self.plan.tag, GATHERING_WEIGHTS):
            self._allocate()
        if self._verifier != verify:
            helper().start()  # it imports torch while the save gathers
        staging = self.plan.staging
        if staging is not None and not staging.deferred:
            staging.run()

    def __call__(self) -> None:
        """The steps after :meth:`prepare`, now or in the background (a :class:`BackgroundWriter` job)."""
        try:
            self.stage()
            self.gather()
            self.vote()
            self.commit()
        finally:
            try:
                for file in self.files:  # what was not committed (idempotent)
                    file.discard()
            finally:
                self.release()

    def stage(self) -> None:
        """Collective: the host copies taken if the save left them to this job (the next step waits for
        them), every rank's check of its masters voted on: nothing is gathered from a wrong read."""
        if self.plan.staging is not None:
            self._step(STAGING, self._copy_and_check)

    def gather(self) -> None:
        """Collective: the weights, then the optimizer state, each written into its file on rank 0 as it
        arrives (the weights sealed in between, so the optimizer file's meta names them). A failure is
        kept (:attr:`failure`) and every rank runs every collective whatever failed."""
        assert self.weights is not None
        weights = self._gather(self.plan.path, lambda: self.weights.entries, self.weights.finish,
                               GATHERING_WEIGHTS)
        if self.optimizer is not None:
            if weights is not None and not self.failure:
                self._seal_weights(weights)
            self._gather(self.plan.optimizer_path, self.optimizer.entries, self.optimizer.finish,
                         GATHERING_OPTIMIZER)

    def vote(self) -> None:
        """Collective: every rank's part arrived (a rank that failed sent zeros), before anything is
        published; else the same SaveError on every rank."""
        self._step(f"sending {self.plan.what}", self._raise_failure)

    def commit(self) -> None:
        """Rank 0 commits the save's files as a whole (:mod:`wenet_hooks.file.commit`). Collective at
        the call: every rank learns whether it did. In the background, only rank 0's job waits for it
        (its fsyncs and verification may take minutes); the next save's vote shares the outcome."""
        phase = f"writing {self.plan.path}"
        if self.plan.group is None:
            self._step(phase, self._commit_files if is_rank0() else lambda: None)
        elif is_rank0():
            try:
                self._commit_files()
            except Exception as e:  # settle_background's vote reports it on every rank
                raise PhaseError(phase, e) from e

    def release(self) -> None:
        """Everything the save holds let go (idempotent): the gathers' buffers, the host copies; a
        staging never taken no longer holds the next step."""
        for pending in (self.weights, self.optimizer):
            if pending is not None:
                pending.release()
        staging = self.plan.staging
        if staging is not None:
            staging.cancel()
            staging.release()

    def _step(self, phase: str, work: Callable[[], Any]) -> None:
        with collective_step(self.plan.tag, phase, self.plan.group):
            work()

    def _allocate(self) -> None:
        plan = self.plan
        self.weights = prepare_consolidate(plan.view, plan.agreed, plan.options.dtype, plan.options.bucket_mb,
                                           plan.group, plan.staging)
        self.weights.host.raise_if_failed()
        if plan.optimizer_keys is not None:
            try:  # never per parameter: no such path
                self.optimizer = prepare_optimizer(plan.view, plan.agreed, plan.optimizer_keys,
                                                   plan.options.bucket_mb or DEFAULT_BUCKET_MB, plan.group,
                                                   plan.staging)
                self.optimizer.host.raise_if_failed()
            except Exception as e:
                raise PhaseError(GATHERING_OPTIMIZER, e) from e

    def _copy_and_check(self) -> None:
        staging = self.plan.staging
        assert staging is not None
        if not staging.done.is_set():
            staging.run()
        if staging.failure:
            raise staging.failure.error  # type: ignore[misc]
        if staging.problem() is not None:
            raise ConsolidationError(staging.problem())

    def _gather(self, path: Path, entries: Callable[[], list[Entry]], finish: Callable[..., Any],
                phase: str) -> Optional[PendingFile]:
        """Collective: one gather; on rank 0 into ``path.tmp`` as the tensors complete."""
        file = None
        if is_rank0():
            try:
                file = PendingFile(path, entries(), verify=self.plan.options.verify, verifier=self._verifier)
                self.files.append(file)
            except Exception as e:  # rank 0 still takes its part in the gather below
                self.failure.record(f"writing {path}", e)
        # Rank 0 hands each tensor or fragment to the file as it arrives; a file that could not be opened
        # drops them (the gather's collectives still go on to their end on every rank).
        receivers = (file.receive, file.receive_part) if file is not None else (_drop, _drop)
        try:
            finish(*(receivers if is_rank0() else (None, None)))
        except Exception as e:
            self.failure.record(phase, e)
        if file is not None and file.failure:
            self.failure.record(file.failure.what, file.failure.error)
        return file

    def _seal_weights(self, weights: PendingFile) -> None:
        """Rank 0, between the two gathers: the weights sealed, so the optimizer file's meta can name them
        (a resume refuses an optimizer file beside weights of another save)."""
        assert self.optimizer is not None
        try:
            weights.seal()
            self.optimizer.meta["weights"] = fingerprint(weights.tmp)  # the save's id
        except Exception as e:  # rank 0 still takes its part in the optimizer's gather
            self.failure.record(f"writing {self.plan.path}", e)

    def _raise_failure(self) -> None:
        if self.failure:
            raise PhaseError(self.failure.what, self.failure.error)

    def _commit_files(self) -> None:
        """Rank 0: the files sealed, renamed, the record last; stale files of this tag removed."""
        commit_files(self.files[0], self.files[1] if len(self.files) > 1 else None, self.plan.record)
        if self.optimizer is None:
            _remove_stale(self.plan.optimizer_path)  # the optimizer file of an earlier save of this tag
        _remove_stale(legacy_optimizer_path(self.plan.path))
        if self.on_written is not None:
            self.on_written()


def _drop(*_: Any) -> None:
    """Rank 0's end of a gather whose file could not be opened (the failure is reported after it)."""


def _remove_stale(optim: Path) -> None:
    """An older save's optimizer file of this tag: it does not belong to the weights just written,
    and a resume would pair them."""
    if optim.is_file():
        optim.unlink()
        logger.info("wenet_hooks: removed %s, which belonged to an earlier save of the same tag", optim)
