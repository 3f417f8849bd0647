"""One save, collectively: gather on every rank, write and verify on rank 0, agree.

This is the WeNet-free pipeline that the WeNet hook calls at each save; any
DeepSpeed trainer can call it after ``engine.save_checkpoint``::

    engine.save_checkpoint(model_dir, tag=tag)
    save_consolidated(engine, model_dir, tag)      # every rank; rank 0 writes <tag>.pt
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from wenet_hooks.background import BackgroundWriter
from wenet_hooks.dist import Failure, all_ok, background_group, first_failure, get_rank, is_rank0, log_rank0
from wenet_hooks.dtypes import DtypeLike
from wenet_hooks.errors import SaveError
from wenet_hooks.file.optimizer_file import legacy_optimizer_path, optimizer_path, to_file_dict
from wenet_hooks.file.publish import write_state_dict
from wenet_hooks.gather import DEFAULT_BUCKET_MB, consolidate
from wenet_hooks.gather.masters import EngineLayout, inspect_engine
from wenet_hooks.gather.optimizer import (
    GatheredOptimizer,
    PendingOptimizer,
    optimizer_unavailable,
    prepare_optimizer,
)

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
        background_gather: with a ``writer``, each rank copies its partitions
            of the optimizer state to host memory and their gather to rank 0
            runs in the background too, over a gloo group of its own (default
            ``True``). Call :func:`settle_background` before
            ``destroy_process_group``, which takes that group with it.
            ``False`` gathers it before returning, as the weights always are.
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
) -> Path:
    """Collective: must be called on all ranks. Write ``<model_dir>/<tag>.pt`` (and ``<tag>.optim``).

    Gathers the full state dict (:func:`wenet_hooks.consolidate`), writes it
    atomically on rank 0 and, with ``options.verify``, reopens it and checks
    every tensor before publishing it; then rank 0 calls ``on_written``. After
    each phase the ranks share their outcome, so a failure anywhere raises on
    every rank. With a ``writer``, rank 0 writes in the background (and, with
    ``options.background_gather``, every rank sends its part of the optimizer
    state from a copy taken now) and this returns;
    :func:`settle_background` reports the outcome.

    Returns:
        The path of the file (on every rank).

    Raises:
        SaveError: on every rank, naming the rank and phase that failed, with
            the failing rank's message and where it raised.
    """
    path = Path(model_dir) / f"{tag}.pt"
    layout = inspect_engine(engine)  # once per save: the weights' gather and the optimizer's read it
    state_dict, failure = _run_phase(lambda: consolidate(engine, options.dtype, options.bucket_mb, layout), tag)
    _raise_if_any_failed(failure, tag, "gathering the weights")
    # With a writer, the optimizer state may be gathered in the background from a copy taken now.
    in_background = writer is not None and options.background_gather
    pending: Optional[PendingOptimizer] = None
    if options.optimizer:
        pending, failure = _run_phase(lambda: _prepare_optimizer(layout, options.bucket_mb, in_background), tag)
        _raise_if_any_failed(failure, tag, "gathering the optimizer state")
    deferred = in_background and pending is not None
    finish: Optional[Callable[[], Optional[GatheredOptimizer]]] = None
    if deferred:
        finish = pending.finish
    elif pending is not None:
        gathered, failure = _run_phase(pending.finish, tag)
        _raise_if_any_failed(failure, tag, "gathering the optimizer state")
        finish = lambda: gathered  # noqa: E731
    job = _save_job(path, state_dict, finish, background_group() if deferred else None, options.verify, on_written)
    del state_dict, pending
    if writer is None:
        _, failure = _run_phase(job, tag)
        _raise_if_any_failed(failure, tag, f"writing {path}")
    elif is_rank0() or deferred:  # the other ranks send their part of a deferred gather
        writer.submit(job, tag, f"gathering the optimizer state and writing {path}" if deferred
                      else f"writing {path}")
    return path


def settle_background(writer: BackgroundWriter) -> None:
    """Collective: wait for this rank's background job in flight; raise on every rank if one failed.

    Raises:
        SaveError: naming the save whose write failed (an earlier one).
    """
    failed = first_failure(writer.wait())
    if failed is not None:
        raise _save_error(failed.tag, f"{failed.what} in the background", failed.failure)


def _prepare_optimizer(layout: EngineLayout, bucket_mb: float, in_background: bool) -> Optional[PendingOptimizer]:
    """Collective: the optimizer state, ready to gather; None where it cannot be gathered (ZeRO-0,
    NVMe-swapped states, state kept outside the base optimizer): the save goes on without it, as
    WeNet's own would."""
    reason = optimizer_unavailable(layout)
    if reason is not None:
        if reason not in _said:  # once per run, not at every save
            _said.add(reason)
            log_rank0(logger, logging.WARNING, "wenet_hooks: no <tag>.optim is written: %s; a resume from "
                      "these saves restarts the optimizer", reason)
        return None
    return prepare_optimizer(layout, bucket_mb or DEFAULT_BUCKET_MB,  # never per parameter: no such path
                             background_group() if in_background else None)


def _save_job(path: Path, state_dict: Optional[dict], finish: Optional[Callable[[], Optional[GatheredOptimizer]]],
              deferred_over: Any, verify: bool, on_written: Optional[Callable[[], None]]) -> Callable[[], None]:
    """Every rank: finish the optimizer state's gather (collective, over ``deferred_over`` when it runs
    in the background). Rank 0: write the weights, then the optimizer file that belongs to them (or
    remove an older one, which would not match)."""
    def job() -> None:
        gathered, failure = None, None
        if finish is not None:
            try:
                gathered = finish()
            except Exception as e:  # the weights are still written; this is raised after
                failure = e
        # A rank that failed sent zeros: rank 0 must know before it publishes what it received.
        all_sent = failure is None
        if deferred_over is not None:
            try:
                all_sent = all_ok(failure is None, "sending the optimizer state", deferred_over)
            except Exception as e:  # the group is gone (destroyed early): the weights are still written
                all_sent, failure = False, failure or e
        if is_rank0():
            write_state_dict(state_dict, path, verify=verify)
            if gathered is not None and all_sent:
                write_state_dict(to_file_dict(gathered.state, gathered.meta), optimizer_path(path), verify=verify)
            else:
                _remove_stale(optimizer_path(path))
            _remove_stale(legacy_optimizer_path(path))
            if on_written is not None and all_sent:
                on_written()
        if failure is not None:
            raise failure

    return job


def _remove_stale(optim: Path) -> None:
    """An older save's optimizer file of this tag: it does not belong to the weights just written,
    and a resume would pair them."""
    if optim.is_file():
        optim.unlink()
        logger.info("wenet_hooks: removed %s, which belonged to an earlier save of the same tag", optim)


def _run_phase(work: Callable[[], Any], tag: str) -> tuple[Any, Optional[Failure]]:
    try:
        return work(), None
    except Exception as e:  # shared with the other ranks, then re-raised there
        logger.exception("wenet_hooks: save '%s' failed here", tag)
        return None, Failure.from_exception(e)


def _raise_if_any_failed(mine: Optional[Failure], tag: str, phase: str) -> None:
    failure = first_failure(mine)
    if failure is not None:
        raise _save_error(tag, phase, failure)


def _save_error(tag: str, phase: str, failure: Failure) -> SaveError:
    # The failing rank logged its own traceback; the others carry its summary.
    remote = failure.traceback if failure.rank != get_rank() else ""
    return SaveError(tag, failure.rank, phase, failure.message, remote)
