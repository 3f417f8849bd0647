"""Gather a DeepSpeed engine's full weights onto rank 0: :func:`consolidate`.

The result is what ``torch.save(model.state_dict())`` of the unwrapped model
would hold if the model had been trained on one device: the same keys in the
same order, tied weights sharing one tensor, persistent buffers present,
non-persistent buffers absent, and parameter values taken from DeepSpeed's
fp32 master weights wherever it keeps them.

- ``masters``: where DeepSpeed keeps the masters (flat partitions, or not),
  read once per save into an ``EngineLayout``;
- ``check``: the masters read, checked against the module's training weights;
- ``bucketed``: the partitions moved to rank 0 in a few large collectives;
- ``per_param``: DeepSpeed's per-parameter gather for the rest, and rank 0's
  host copies;
- ``optimizer``: the optimizer state, in the masters' layout, through the same
  bucketed collectives.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Optional

import torch
from wenet_hooks.dist import is_rank0
from wenet_hooks.dtypes import DtypeLike, resolve_dtype
from wenet_hooks.gather.bucketed import DEFAULT_BUCKET_MB, prepare_gather
from wenet_hooks.gather.check import check_masters, per_parameter_hint
from wenet_hooks.gather.masters import EngineLayout, inspect_engine, unwrap_model
from wenet_hooks.gather.per_param import HostCopies, PerParameterChecks, gather_entry

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUCKET_MB", "consolidate", "unwrap_model"]


def consolidate(
    engine: Any, dtype: DtypeLike = "fp32", bucket_mb: float = DEFAULT_BUCKET_MB,
    layout: Optional[EngineLayout] = None,
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
        layout: the engine already inspected for this save (else it is inspected here).

    Returns:
        On rank 0, an ordered ``dict[str, Tensor]`` on CPU whose keys are exactly
        ``engine.module.state_dict().keys()``; tied keys map to one tensor.
        ``None`` on every other rank.

    Raises:
        ConsolidationError: on every rank when the masters read differ from
            the training weights (naming the parameters); on the rank where
            anything else failed, after every collective of the gather has run
            on every rank.
    """
    layout = layout or inspect_engine(engine)
    copy = HostCopies(resolve_dtype(dtype), enabled=is_rank0())
    started = time.perf_counter()
    with torch.no_grad():
        check_masters(layout)
        bucketed = prepare_gather(layout, copy.target, int(bucket_mb * 2**20), copy.record_failure).run()
    # Tied weights are one Parameter object under several keys: gather it once
    # and reuse the CPU copy, so the file stores it once, as torch.save would.
    gathered: dict[int, Optional[torch.Tensor]] = {
        id(layout.params[i]): bucketed.tensors.get(i) for i in bucketed.indices}
    mismatches = PerParameterChecks(per_parameter_hint(engine))
    result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    with torch.no_grad():
        for key, tensor in layout.entries.items():
            if id(tensor) not in gathered:
                gathered[id(tensor)] = gather_entry(key, tensor, layout.masters.get(id(tensor)), copy, mismatches)
            result[key] = gathered[id(tensor)]
    mismatches.raise_if_any()
    copy.raise_if_failed()
    if not copy.enabled:
        return None
    _log_summary(result, time.perf_counter() - started)
    return result


def _log_summary(state_dict: "OrderedDict[str, torch.Tensor]", seconds: float) -> None:
    unique = {id(t): t for t in state_dict.values()}
    nbytes = sum(t.numel() * t.element_size() for t in unique.values())
    logger.info("consolidated %d tensors (%d unique, %.1f MB) in %.2f s", len(state_dict), len(unique),
                nbytes / 1e6, seconds)
