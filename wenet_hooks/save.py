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
from wenet_hooks.dist import Failure, first_failure, get_rank, is_rank0, log_rank0
from wenet_hooks.dtypes import DtypeLike
from wenet_hooks.errors import SaveError
from wenet_hooks.file.optimizer_file import optimizer_path, to_file_dict
from wenet_hooks.file.publish import write_state_dict
from wenet_hooks.gather import DEFAULT_BUCKET_MB, consolidate
from wenet_hooks.gather.optimizer import consolidate_optimizer, optimizer_unavailable

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
        optimizer: also write ``<tag>.optim.pt``, the optimizer state under
            the model's key names, for an exact resume at any world size and
            ZeRO stage (:func:`wenet_hooks.resume.restore`). Default ``False``.
    """

    dtype: DtypeLike = "fp32"
    verify: bool = True
    bucket_mb: float = DEFAULT_BUCKET_MB
    optimizer: bool = False


def save_consolidated(
    engine: Any,
    model_dir: Union[str, Path],
    tag: str,
    options: SaveOptions = SaveOptions(),
    *,
    writer: Optional[BackgroundWriter] = None,
    on_written: Optional[Callable[[], None]] = None,
) -> Path:
    """Collective: must be called on all ranks. Write ``<model_dir>/<tag>.pt`` (and ``<tag>.optim.pt``).

    Gathers the full state dict (:func:`wenet_hooks.consolidate`), writes it
    atomically on rank 0 and, with ``options.verify``, reopens it and checks
    every tensor before publishing it; then rank 0 calls ``on_written``. After
    each phase the ranks share their outcome, so a failure anywhere raises on
    every rank. With a ``writer``, rank 0 writes in the background and this
    returns after the gather; :func:`settle_background` reports the outcome.

    Returns:
        The path of the file (on every rank).

    Raises:
        SaveError: on every rank, naming the rank and phase that failed, with
            the failing rank's message and where it raised.
    """
    path = Path(model_dir) / f"{tag}.pt"
    state_dict, failure = _run_phase(lambda: consolidate(engine, options.dtype, options.bucket_mb), tag)
    _raise_if_any_failed(failure, tag, "gathering the weights")
    files = {path: state_dict, optimizer_path(path): None}  # None: no optimizer file (a stale one goes)
    if options.optimizer:
        gathered, failure = _run_phase(lambda: _optimizer_file(engine, options.bucket_mb), tag)
        _raise_if_any_failed(failure, tag, "gathering the optimizer state")
        files[optimizer_path(path)] = gathered
    job = _write_job(files, options.verify, on_written) if is_rank0() else None
    del state_dict, files
    if writer is not None:
        if job is not None:
            writer.submit(job, tag, f"writing {path}")
        return path
    _, failure = _run_phase(job, tag) if job is not None else (None, None)
    _raise_if_any_failed(failure, tag, f"writing {path}")
    return path


def settle_background(writer: BackgroundWriter) -> None:
    """Collective: wait for rank 0's write in flight; raise on every rank if it failed.

    Raises:
        SaveError: naming the save whose write failed (an earlier one).
    """
    failed = first_failure(writer.wait() if is_rank0() else None)
    if failed is not None:
        raise _save_error(failed.tag, f"{failed.what} in the background", failed.failure)


def _optimizer_file(engine: Any, bucket_mb: float) -> Optional[dict]:
    """Collective: the optimizer file's content on rank 0, or None where it cannot be gathered
    (ZeRO-0, NVMe-swapped states): the save goes on without it, as WeNet's own would."""
    reason = optimizer_unavailable(engine)
    if reason is not None:
        if reason not in _said:  # once per run, not at every save
            _said.add(reason)
            log_rank0(logger, logging.WARNING, "wenet_hooks: no <tag>.optim.pt is written: %s; a resume from "
                      "these saves restarts the optimizer", reason)
        return None
    gathered = consolidate_optimizer(engine, bucket_mb or DEFAULT_BUCKET_MB)  # never per parameter: no such path
    return to_file_dict(gathered.state, gathered.meta) if gathered is not None else None


def _write_job(files: dict[Path, Optional[dict]], verify: bool, on_written: Optional[Callable[[], None]]):
    def job() -> None:
        for path, state_dict in files.items():  # the weights first: the optimizer file belongs to them
            if state_dict is not None:
                write_state_dict(state_dict, path, verify=verify)
            elif path.is_file():  # an older save's optimizer file would not match these weights
                path.unlink()
        if on_written is not None:
            on_written()

    return job


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
