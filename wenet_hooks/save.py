"""One save, collectively: gather on every rank, write and verify on rank 0, agree.

This is the WeNet-free pipeline that the WeNet hook calls at each save; any
DeepSpeed trainer can call it after ``engine.save_checkpoint``::

    engine.save_checkpoint(model_dir, tag=tag)
    save_consolidated(engine, model_dir, tag)      # every rank; rank 0 writes <tag>.pt

One save, in order, with the collectives each step makes:

1. plan (:func:`_prepare`): the engine inspected once; every rank's "my
   partitions are as agreed" and its optimizer state keys exchanged in one
   collective (a second, of every rank's fragments, at an engine's first save);
2. prepare: the gathers allocated, the host copies registered; one vote;
3. the job (:mod:`wenet_hooks.save_job`), now or in the background: stage
   (copies taken, check voted) -> gather -> vote -> commit
   (:mod:`wenet_hooks.file.commit`).

A failure in any step raises :class:`~wenet_hooks.errors.SaveError` on every
rank (in a background save, at the next save or :func:`settle_background`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from wenet_hooks.background import BackgroundWriter
from wenet_hooks.dist import Failure, background_group, first_failure, get_rank, log_rank0
from wenet_hooks.dtypes import DtypeLike
from wenet_hooks.errors import PhaseError, SaveError
from wenet_hooks.gather import DEFAULT_BUCKET_MB, PendingWeights, prepare_consolidate
from wenet_hooks.gather.agreement import agree_with
from wenet_hooks.gather.masters import EngineView, inspect_engine
from wenet_hooks.gather.optimizer import PendingOptimizer, agreed_state_keys, prepare_optimizer, state_keys
from wenet_hooks.gather.staging import Staging, new_staging, torch_optimizers
from wenet_hooks.save_job import GATHERING_OPTIMIZER, GATHERING_WEIGHTS, SaveJob

logger = logging.getLogger(__name__)
_said: set[str] = set()  # warnings already logged in this process


@dataclass(frozen=True)
class SaveOptions:
    """How :func:`save_consolidated` makes ``<tag>.pt``.

    Attributes:
        dtype: floating tensors are stored in this dtype. ``"fp32"`` (the
            default) holds DeepSpeed's fp32 master weights bit for bit;
            ``"bf16"`` or ``"fp16"`` halve the file. Integer buffers keep theirs.
        verify: reopen the written file and check every key, shape, dtype and
            CRC32 before publishing it (default ``True``).
        bucket_mb: megabytes rank 0 receives per collective while gathering
            DeepSpeed's flat fp32 partitions, which is also the gather's extra
            accelerator memory (default 16). ``0`` uses DeepSpeed's
            per-parameter ``safe_get_full_fp32_param`` instead.
        optimizer: also write ``<tag>.optim``, the optimizer state under
            the model's key names, for an exact resume at any world size and
            ZeRO stage (:func:`wenet_hooks.resume.restore`). Default ``False``.
        background_gather: with a ``writer``, each rank's copy of its
            partitions of the masters (and of the optimizer state) to host
            memory, with the check of the masters, is taken by the save's
            background job, and the next optimizer step waits for it
            (:mod:`wenet_hooks.gather.staging`); the gathers to rank 0 and its
            writing follow there, over a gloo group of the package's own
            (default ``True``). Call
            :func:`settle_background` before ``destroy_process_group``, which
            takes that group with it. ``False``: gathered and written before
            returning, as without a writer.
    """

    dtype: DtypeLike = "fp32"
    verify: bool = True
    bucket_mb: float = DEFAULT_BUCKET_MB
    optimizer: bool = False
    background_gather: bool = True


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
    phase the ranks share their outcome, so a failure anywhere raises on every
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
        SaveError: on every rank, naming the rank and phase that failed, with
            the failing rank's message and where it raised.
    """
    path = Path(model_dir) / f"{tag}.pt"
    # The caller may change its dict as soon as this returns (WeNet's executor does): the save owns a copy.
    record = copy.deepcopy(dict(record)) if record is not None else None
    view = inspect_engine(engine)  # once per save: the weights' gather and the optimizer's read it
    # With a writer, the gathers run in the background, from host copies of each rank's partitions, over
    # the package's own gloo group (made collectively here the first time).
    deferred = writer is not None and options.background_gather
    group = background_group() if deferred else None
    # The host copies (and the check that reads them) are taken by the background job, the next optimizer
    # step waiting for them, where the partitions lie in host memory (else now, before returning).
    staging = new_staging(engine, _on_host(view), torch_optimizers(engine)) if deferred else None
    try:
        job = _prepare(engine, path, tag, options, view, group, staging, on_written, record)
        if staging is not None and not staging.deferred:
            staging.run()
        if deferred:
            writer.submit(job, tag, f"gathering {job.what} and writing {path}")
    except BaseException:
        if staging is not None:  # never taken: the next step must not wait for it
            staging.cancel()
            staging.release()
        raise
    if not deferred:  # gathered and written before training goes on
        _, failure = _run_phase(job, tag)
        _raise_if_any_failed(failure, tag, f"writing {path}")
    return path


def _prepare(engine: Any, path: Path, tag: str, options: SaveOptions, view: EngineView, group: Any,
             staging: Optional[Staging], on_written: Optional[Callable[[], None]],
             record: Optional[Mapping[str, Any]]) -> SaveJob:
    """Collective: the save's plan agreed in one exchange (the flat layout and the optimizer state's
    keys), every gather prepared, one vote; what remains of the save, as a job."""
    keys = agree_with(view, state_keys(view) if options.optimizer else None)
    weights: Optional[PendingWeights] = None
    pending: Optional[PendingOptimizer] = None
    phase = GATHERING_WEIGHTS
    try:
        weights = prepare_consolidate(engine, options.dtype, options.bucket_mb, view, group, staging)
        if options.optimizer:
            phase = GATHERING_OPTIMIZER
            pending = _prepare_optimizer(view, agreed_state_keys(keys), options.bucket_mb, group, staging)
        failure = None
    except Exception as e:  # voted on below, with every rank's
        logger.exception("wenet_hooks: save '%s' failed here", tag)
        failure = Failure.from_exception(e.cause if isinstance(e, PhaseError) else e, phase=phase)
    _raise_if_any_failed(failure, tag, phase)
    assert weights is not None
    return SaveJob(path, weights, pending, group, options.verify, on_written, staging, record)


def _on_host(view: EngineView) -> bool:
    """Whether every flat partition (and so its optimizer state) lies in host memory."""
    parts = view.partitions
    return parts is not None and all(flat.device.type == "cpu" for flat in parts.flats)


def settle_background(writer: BackgroundWriter) -> None:
    """Collective: wait for this rank's background job in flight; raise on every rank if one failed.

    Raises:
        SaveError: naming the save whose write failed (an earlier one).
    """
    failed = first_failure(writer.wait())
    if failed is not None:
        raise _save_error(failed.tag, f"{failed.what} in the background", failed.failure)


def _prepare_optimizer(view: EngineView, keys: Union[list[str], str], bucket_mb: float, group: Any,
                       staging: Optional[Staging]) -> Optional[PendingOptimizer]:
    """The optimizer state, ready to gather; None where it cannot be gathered (``keys`` says why: ZeRO-0,
    NVMe-swapped states, state kept outside the base optimizer): the save goes on without it, as WeNet's
    own would."""
    if isinstance(keys, str):
        reason = keys
        if reason not in _said:  # once per run, not at every save
            _said.add(reason)
            log_rank0(logger, logging.WARNING, "wenet_hooks: no <tag>.optim is written: %s; a resume from "
                      "these saves restarts the optimizer", reason)
        return None
    # never per parameter: no such path
    return prepare_optimizer(view, keys, bucket_mb or DEFAULT_BUCKET_MB, group, staging)


def _run_phase(work: Callable[[], Any], tag: str) -> tuple[Any, Optional[Failure]]:
    try:
        return work(), None
    except Exception as e:  # shared with the other ranks, then re-raised there
        logger.exception("wenet_hooks: save '%s' failed here", tag)
        if isinstance(e, PhaseError):  # the phase it happened in travels with it
            return None, Failure.from_exception(e.cause, phase=e.phase)
        return None, Failure.from_exception(e)


def _raise_if_any_failed(mine: Optional[Failure], tag: str, phase: str) -> None:
    failure = first_failure(mine)
    if failure is not None:
        raise _save_error(tag, failure.phase or phase, failure)


def _save_error(tag: str, phase: str, failure: Failure) -> SaveError:
    # The failing rank logged its own traceback; the others carry its summary.
    remote = failure.traceback if failure.rank != get_rank() else ""
    return SaveError(tag, failure.rank, phase, failure.message, remote)
