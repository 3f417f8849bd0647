"""One save, collectively: gather on every rank, write and verify on rank 0, agree.

This is the WeNet-free pipeline that the WeNet hook calls at each save; any
DeepSpeed trainer can call it after ``engine.save_checkpoint``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from wenet_hooks.consolidate import DtypeLike, consolidate
from wenet_hooks.dist import first_error, is_rank0
from wenet_hooks.errors import SaveError
from wenet_hooks.io import write_state_dict
from wenet_hooks.verify import Manifest

logger = logging.getLogger(__name__)


def save_consolidated(
    engine: Any,
    model_dir: Union[str, Path],
    tag: str,
    *,
    dtype: DtypeLike = "fp32",
    verify: bool = True,
) -> Path:
    """Collective: must be called on all ranks. Write ``<model_dir>/<tag>.pt``.

    Gathers the full state dict (:func:`wenet_hooks.consolidate`), writes it
    atomically on rank 0 and, with ``verify``, reopens it and checks every
    tensor before publishing it. After each phase the ranks share their
    outcome, so a failure anywhere raises on every rank.

    Returns:
        The path of the file (on every rank).

    Raises:
        SaveError: on every rank, naming the rank and phase that failed.
    """
    path = Path(model_dir) / f"{tag}.pt"
    state_dict, error = _run_phase(lambda: consolidate(engine, dtype), tag)
    _raise_if_any_failed(error, tag, "gathering the weights")
    _, error = _run_phase(lambda: _write_on_rank0(state_dict, path, verify), tag)
    del state_dict
    _raise_if_any_failed(error, tag, f"writing {path}")
    return path


def _write_on_rank0(state_dict: Optional[dict], path: Path, verify: bool) -> None:
    if not is_rank0():
        return
    expected = Manifest.from_state_dict(state_dict) if verify else None
    write_state_dict(state_dict, path, expected=expected)


def _run_phase(work, tag: str) -> tuple[Any, Optional[str]]:
    try:
        return work(), None
    except Exception as e:  # shared with the other ranks, then re-raised there
        logger.exception("wenet_hooks: save '%s' failed here", tag)
        return None, str(e)


def _raise_if_any_failed(error: Optional[str], tag: str, phase: str) -> None:
    failure = first_error(error)
    if failure is not None:
        rank, reason = failure
        raise SaveError(tag, rank, phase, reason)
