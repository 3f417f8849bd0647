"""One save's plan: what it writes, where, and what every rank holds, built and agreed once.

:func:`plan_save` is the only step of a save that reads the engine: it
inspects it once (:func:`~wenet_hooks.gather.masters.inspect_engine`) and, in
one collective, every rank says whether its partitions are still as agreed and
which optimizer state it keeps (:func:`~wenet_hooks.gather.agreement.agree`;
a second collective, of every rank's fragments, at an engine's first save or
after its partitions changed). Every later step reads the plan.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from wenet_hooks.dist import background_group, log_rank0
from wenet_hooks.dtypes import DtypeLike
from wenet_hooks.file.optimizer_file import optimizer_path
from wenet_hooks.gather.agreement import AgreedLayout, agree
from wenet_hooks.gather.bucketed import DEFAULT_BUCKET_MB
from wenet_hooks.gather.masters import EngineView, inspect_engine
from wenet_hooks.gather.optimizer import agreed_state_keys, state_keys
from wenet_hooks.gather.staging import Staging, guard_steps, new_staging

logger = logging.getLogger(__name__)
_said: set[str] = set()  # warnings already logged in this process


@dataclass(frozen=True)
class SaveOptions:
    """How :func:`~wenet_hooks.save.save_consolidated` makes ``<tag>.pt``.

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
            :func:`~wenet_hooks.save.settle_background` before
            ``destroy_process_group``, which takes that group with it.
            ``False``: gathered and written before returning, as without a writer.
    """

    dtype: DtypeLike = "fp32"
    verify: bool = True
    bucket_mb: float = DEFAULT_BUCKET_MB
    optimizer: bool = False
    background_gather: bool = True


@dataclass(frozen=True)
class SavePlan:
    """One save as every rank agreed on it (:func:`plan_save`)."""

    path: Path  # <model_dir>/<tag>.pt
    optimizer_path: Path  # <model_dir>/<tag>.optim
    tag: str
    what: str  # what the save gathers, for messages
    options: SaveOptions
    view: EngineView  # the engine, read once
    agreed: Optional[AgreedLayout]  # the partitions' layout every rank agreed on; None: gathered per parameter
    optimizer_keys: Optional[list[str]]  # the optimizer state tensors gathered into <tag>.optim; None: no file
    group: Any = None  # the gloo group of a background save; None: the default group, before the call returns
    staging: Optional[Staging] = None  # a background save's host copies, and the check that reads them
    record: Optional[dict[str, Any]] = None  # written as <tag>.yaml at the commit; copied at the call


def plan_save(engine: Any, model_dir: Union[str, Path], tag: str, options: SaveOptions, *, background: bool,
              record: Optional[Mapping[str, Any]] = None) -> SavePlan:
    """Collective: the plan of one save of ``engine``; ``background``: its gathers run later, off the
    training thread, over the package's gloo group (made collectively here the first time).

    Raises:
        ConsolidationError: the engine cannot be read (on every rank alike).
    """
    path = Path(model_dir) / f"{tag}.pt"
    # The caller may change its dict as soon as the save returns (WeNet's executor does): the save owns a copy.
    record = copy.deepcopy(dict(record)) if record is not None else None
    view = inspect_engine(engine)
    group = background_group() if background else None
    mine = state_keys(view.partitions, view.optimizer, view.wrapper) if options.optimizer else None
    agreed, reports = agree(view.partitions, view.params, view.state.agreed, mine)  # kept for the next save
    keys = _optimizer_keys(agreed_state_keys(reports)) if options.optimizer else None
    what = "the weights and the optimizer state" if keys is not None else "the weights"
    # Last, once nothing else can fail: the host copies (and the check that reads them) are taken by the
    # background job, the next optimizer step waiting for them, where the partitions lie in host memory
    # (else at the call, before returning). From here the Save releases them, whatever happens.
    if background and view.state.guard is None:
        guard_steps(engine, view)  # once per engine
    staging = new_staging(view) if background else None
    return SavePlan(path, optimizer_path(path), tag, what, options, view, agreed, keys, group, staging, record)


def _optimizer_keys(keys: Union[list[str], str]) -> Optional[list[str]]:
    """The state keys every rank agreed on; None where the state cannot be gathered (``keys`` says why:
    ZeRO-0, NVMe-swapped states, state kept outside the base optimizer): the save goes on without it,
    as WeNet's own would."""
    if not isinstance(keys, str):
        return keys
    if keys not in _said:  # once per run, not at every save
        _said.add(keys)
        log_rank0(logger, logging.WARNING, "wenet_hooks: no <tag>.optim is written: %s; a resume from these "
                  "saves restarts the optimizer", keys)
    return None
