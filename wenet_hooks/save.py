"""One save, collectively: gather on every rank, write and verify on rank 0, agree.

This is the WeNet-free pipeline that the WeNet hook calls at each save; any
DeepSpeed trainer can call it after ``engine.save_checkpoint``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

from wenet_hooks.background import BackgroundWriter
from wenet_hooks.consolidate import DtypeLike, consolidate
from wenet_hooks.dist import first_error, is_rank0
from wenet_hooks.errors import SaveError, describe
from wenet_hooks.gather import DEFAULT_BUCKET_MB
from wenet_hooks.io import write_state_dict

logger = logging.getLogger(__name__)


def save_consolidated(
    engine: Any,
    model_dir: Union[str, Path],
    tag: str,
    *,
    dtype: DtypeLike = "fp32",
    verify: bool = True,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    writer: Optional[BackgroundWriter] = None,
    on_written: Optional[Callable[[], None]] = None,
) -> Path:
    """Collective: must be called on all ranks. Write ``<model_dir>/<tag>.pt``.

    Gathers the full state dict (:func:`wenet_hooks.consolidate`), writes it
    atomically on rank 0 and, with ``verify``, reopens it and checks every
    tensor before publishing it; then rank 0 calls ``on_written``. After each
    phase the ranks share their outcome, so a failure anywhere raises on
    every rank. With a ``writer``, rank 0 writes in the background and this
    returns after the gather; ``settle_background`` reports the outcome.

    Returns:
        The path of the file (on every rank).

    Raises:
        SaveError: on every rank, naming the rank and phase that failed.
    """
    path = Path(model_dir) / f"{tag}.pt"
    state_dict, error = _run_phase(lambda: consolidate(engine, dtype, bucket_mb), tag)
    _raise_if_any_failed(error, tag, "gathering the weights")
    job = _write_job(state_dict, path, verify, on_written) if is_rank0() else None
    del state_dict
    if writer is not None:
        if job is not None:
            writer.submit(job, f"writing {path}")
        return path
    _, error = _run_phase(job, tag) if job is not None else (None, None)
    _raise_if_any_failed(error, tag, f"writing {path}")
    return path


def settle_background(writer: BackgroundWriter, tag: str) -> None:
    """Collective: wait for rank 0's write in flight; raise on every rank if it failed.

    Raises:
        SaveError: naming the write that failed (a previous save's).
    """
    error = writer.wait() if is_rank0() else None
    _raise_if_any_failed(error, tag, "writing in the background")


def _write_job(state_dict: dict, path: Path, verify: bool, on_written: Optional[Callable[[], None]]):
    def job() -> None:
        write_state_dict(state_dict, path, verify=verify)
        if on_written is not None:
            on_written()

    return job


def _run_phase(work, tag: str) -> tuple[Any, Optional[str]]:
    try:
        return work(), None
    except Exception as e:  # shared with the other ranks, then re-raised there
        logger.exception("wenet_hooks: save '%s' failed here", tag)
        return None, describe(e)


def _raise_if_any_failed(error: Optional[str], tag: str, phase: str) -> None:
    failure = first_error(error)
    if failure is not None:
        rank, reason = failure
        raise SaveError(tag, rank, phase, reason)
