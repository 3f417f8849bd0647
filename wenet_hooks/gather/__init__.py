"""Gather a DeepSpeed engine's full weights onto rank 0: :func:`consolidate`.

The result is what ``torch.save(model.state_dict())`` of the unwrapped model
would hold if the model had been trained on one device: the same keys in the
same order, tied weights sharing one tensor, persistent buffers present,
non-persistent buffers absent, and parameter values taken from DeepSpeed's
fp32 master weights wherever it keeps them.

- ``masters``: where DeepSpeed keeps the masters (flat partitions, or not),
  read once per save into an ``EngineView``;
- ``check``: the masters read, checked against the module's training weights;
- ``bucketed``: the partitions moved to rank 0 in a few large collectives;
- ``per_param``: DeepSpeed's per-parameter gather for the rest, and rank 0's
  host copies;
- ``optimizer``: the optimizer state, in the masters' view, through the same
  bucketed collectives.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from wenet_hooks.dist import is_rank0
from wenet_hooks.dtypes import DtypeLike, resolve_dtype
from wenet_hooks.errors import ConsolidationError
from wenet_hooks.file.writer import Entry, InMemory
from wenet_hooks.gather.agreement import AgreedLayout, agree
from wenet_hooks.gather.bucketed import DEFAULT_BUCKET_MB, PendingGather, Write, WritePart, prepare_gather
from wenet_hooks.gather.check import ChunkCheck, check_masters
from wenet_hooks.gather.masters import EngineView, full_numel, full_shape, inspect_engine, unwrap_model
from wenet_hooks.gather.per_param import ToHost, PerParameterChecks, gather_entry
from wenet_hooks.gather.staging import Staging

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUCKET_MB", "consolidate", "unwrap_model"]


def consolidate(
    engine: Any, dtype: DtypeLike = "fp32", bucket_mb: float = DEFAULT_BUCKET_MB,
) -> Optional["OrderedDict[str, torch.Tensor]"]:
    """Collective: must be called on all ranks. Gather the full state dict onto rank 0's CPU.

    Parameters come from DeepSpeed's fp32 master copy for ZeRO-1/2/3 and the
    bf16 optimizer: its flat partitions are sent to rank 0 in buckets of
    ``bucket_mb``; where their layout is not one we know, or with
    ``bucket_mb=0``, parameter by parameter with
    ``deepspeed.utils.safe_get_full_fp32_param``. Parameters without a master
    copy (ZeRO-0 in fp32, frozen parameters) come from the module itself,
    gathered with ``deepspeed.zero.GatheredParameters`` under ZeRO-3. Buffers
    come from rank 0. Every master read is first checked against the module's
    own training weights (:mod:`wenet_hooks.gather.check`). The extra
    accelerator memory is one bucket (on rank 0 over gloo, on every rank over
    NCCL), or the largest parameter on the per-parameter path.

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (or a plain ``nn.Module``).
        dtype: floating tensors are cast to this (``"fp32"``, ``"bf16"``,
            ``"fp16"``); integer buffers keep their dtype.
        bucket_mb: megabytes rank 0 receives per collective.

    Returns:
        On rank 0, an ordered ``dict[str, Tensor]`` on CPU whose keys are exactly
        ``engine.module.state_dict().keys()``; tied keys map to one tensor.
        ``None`` on every other rank.

    Raises:
        ConsolidationError: on every rank when the masters read differ from
            the training weights (naming the parameters), or when allocating
            (or a per-parameter copy to rank 0's host memory) failed on any
            rank, before the bucketed gather; on the rank where anything else
            failed, after every collective of the gather has run on every rank.
    """
    started = time.perf_counter()
    view = inspect_engine(engine)
    agreed, _ = agree(view.partitions, view.params, view.state.agreed)
    pending = prepare_consolidate(view, agreed, dtype, bucket_mb)
    try:
        pending.host.raise_if_failed_anywhere()  # every rank allocated its part, or none gathers
    except ConsolidationError:
        pending.release()
        raise
    sink = InMemory(pending.entries) if is_rank0() else None
    pending.finish(sink and sink.receive, sink and sink.receive_part)
    if sink is None:
        return None
    result = sink.state_dict()
    _log_summary(result, time.perf_counter() - started)
    return result


def prepare_consolidate(
    view: EngineView, agreed: Optional[AgreedLayout], dtype: DtypeLike = "fp32",
    bucket_mb: float = DEFAULT_BUCKET_MB, background_group: Any = None, staging: Optional[Staging] = None,
) -> PendingWeights:
    """Collective: :func:`consolidate` up to the bucketed gather, which :meth:`PendingWeights.finish` runs.

    ``agreed``: the layout of the partitions every rank agreed on
    (:func:`~wenet_hooks.gather.agreement.agree`; None: none usable, every
    parameter gathered the per-parameter way). Now: the check of the masters
    against the training weights, and everything gathered parameter by parameter (frozen parameters,
    buffers, layouts the bucketed gather does not know). With
    ``background_group`` each rank also copies its flat partitions to host
    memory now, so ``finish`` can run later, off the training thread, over
    that group (see :func:`wenet_hooks.gather.bucketed.prepare_gather`). With
    ``staging`` as well, those copies, and the check with them, are taken when
    the staging runs (:mod:`wenet_hooks.gather.staging`): its caller votes on
    the check's finding before ``finish``. A failure to allocate is kept in the
    result's ``host``: the caller votes on it before ``finish``
    (:meth:`~wenet_hooks.gather.per_param.ToHost.raise_if_failed_anywhere`).

    Raises:
        ConsolidationError: as :func:`consolidate`, for what is done now.
    """
    host = ToHost(resolve_dtype(dtype), enabled=is_rank0())
    with torch.no_grad():
        if staging is not None:
            staging.add_check(ChunkCheck(view.partitions, view.names))
        else:
            check_masters(view.partitions, view.names)
        bucketed = prepare_gather(view.partitions, agreed, host.target, int(bucket_mb * 2**20), host.failure,
                                  background_group=background_group, staging=staging, pool=view.state.pool)
    covered = {id(view.params[i]) for i in bucketed.indices}
    # Tied weights are one Parameter object under several keys: gather it once
    # and reuse the CPU host, so the file stores it once, as torch.save would.
    ready: dict[int, Optional[torch.Tensor]] = {}
    mismatches = PerParameterChecks(view.hint)
    with torch.no_grad():
        for key, tensor in view.entries.items():
            if id(tensor) not in covered and id(tensor) not in ready:
                ready[id(tensor)] = gather_entry(key, tensor, view.masters.get(id(tensor)), host, mismatches)
    mismatches.raise_if_any()
    keys = [(key, id(tensor)) for key, tensor in view.entries.items()]
    index_of = {id(view.params[i]): i for i in bucketed.indices}
    return PendingWeights(keys, index_of, ready, bucketed, host, _entries(view, host.target))


def _entries(view: EngineView, target: torch.dtype) -> list[Entry]:
    """The file the gathered weights make, from shapes alone: keys in state_dict order, tied keys as
    aliases of their first (as ``torch.save`` stores a shared tensor once)."""
    first: dict[int, str] = {}
    entries = []
    for key, tensor in view.entries.items():
        if id(tensor) in first and full_numel(tensor):
            entries.append(Entry(key, alias_of=first[id(tensor)]))
            continue
        first.setdefault(id(tensor), key)
        entries.append(Entry(key, tuple(full_shape(tensor)), target if tensor.is_floating_point() else tensor.dtype))
    return entries


@dataclass
class PendingWeights:
    """The weights as they were at :func:`prepare_consolidate`; :meth:`finish` sends them to rank 0's sink."""

    keys: list[tuple[str, int]]  # state_dict order: (key, id of its tensor)
    index_of: dict[int, int]  # id of a parameter gathered in buckets -> its index in the gather
    ready: dict[int, Optional[torch.Tensor]]  # id of a tensor gathered already -> its CPU copy (rank 0)
    bucketed: PendingGather
    host: ToHost
    entries: list[Entry]  # the file (or state dict) these weights make: what the sink receives
    peak_bytes: int = 0  # the most the bucketed gather held at once on rank 0 (after finish)

    def finish(self, write: Optional[Write], write_part: Optional[WritePart]) -> None:
        """Collective over the group the gather was prepared with: on rank 0, each tensor gathered
        already goes to ``write(key, tensor)`` and each fragment of the partitions to
        ``write_part(key, start, values)`` as it arrives (a sink's ``receive`` and ``receive_part``):
        rank 0 never holds the whole model, nor even a whole parameter. Elsewhere both are None.

        Raises:
            ConsolidationError: something failed on this rank (after every collective ran).
        """
        if write is not None and write_part is None:
            raise ValueError("a sink takes fragments too: pass its receive_part as write_part")
        first_key: dict[int, str] = {}
        for key, tensor_id in self.keys:
            first_key.setdefault(tensor_id, key)
        by_index = {index: first_key[tensor_id] for tensor_id, index in self.index_of.items()}
        place = None if write_part is None else lambda index, start, values: write_part(by_index[index], start, values)
        self.peak_bytes = self.bucketed.run(place)
        self.host.raise_if_failed()
        if write is not None and self.host.enabled:
            stored = {e.key for e in self.entries if not e.alias_of}
            for key, tensor_id in self.keys:
                if tensor_id in self.ready and key in stored:
                    write(key, self.ready[tensor_id])

    def release(self) -> None:
        """The gather's buffers freed (idempotent): never run, or run already."""
        self.bucketed.release()


def _log_summary(state_dict: "OrderedDict[str, torch.Tensor]", seconds: float) -> None:
    unique = {id(t): t for t in state_dict.values()}
    nbytes = sum(t.numel() * t.element_size() for t in unique.values())
    logger.info("consolidated %d tensors (%d unique, %.1f MB) in %.2f s", len(state_dict), len(unique),
                nbytes / 1e6, seconds)
