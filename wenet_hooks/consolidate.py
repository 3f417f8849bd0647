"""Gather a DeepSpeed engine's full weights, one tensor at a time, onto rank 0.

The result is what ``torch.save(model.state_dict())`` of the unwrapped model
would hold if the model had been trained on one device: the same keys in the
same order, tied weights sharing one tensor, persistent buffers present,
non-persistent buffers absent, and parameter values taken from DeepSpeed's
fp32 master weights wherever it keeps them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Union

import torch
from torch import nn

from wenet_hooks.dist import get_rank, is_rank0
from wenet_hooks.errors import ConsolidationError, describe
from wenet_hooks.gather import DEFAULT_BUCKET_MB, gather_partitions
from wenet_hooks.partitions import full_shape

logger = logging.getLogger(__name__)

DtypeLike = Union[str, torch.dtype]

# The spellings WeNet and DeepSpeed configs use for training precision.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: DtypeLike) -> torch.dtype:
    """Turn ``"fp32"``/``"bf16"``/``"fp16"`` (or a torch floating dtype) into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}; found {dtype!r}")


def unwrap_model(engine: Any) -> nn.Module:
    """The user's model inside a DeepSpeed engine (or the module itself)."""
    module = getattr(engine, "module", engine)
    if not isinstance(module, nn.Module):
        raise ConsolidationError(
            f"expected a DeepSpeed engine or a torch.nn.Module; found {type(engine).__name__}"
        )
    return module


def consolidate(
    engine: Any, dtype: DtypeLike = "fp32", bucket_mb: float = DEFAULT_BUCKET_MB
) -> "OrderedDict[str, torch.Tensor] | None":
    """Collective: must be called on all ranks. Gather the full state dict onto rank 0's CPU.

    Parameters come from DeepSpeed's fp32 master copy for ZeRO-1/2/3 and the
    bf16 optimizer: its flat partitions are sent to rank 0 in buckets of
    ``bucket_mb`` (:mod:`wenet_hooks.gather`); where their layout is not one we
    know, or with ``bucket_mb=0``, parameter by parameter with
    ``deepspeed.utils.safe_get_full_fp32_param``. Parameters without a master
    copy (ZeRO-0 in fp32, frozen parameters) come from the module itself,
    gathered with ``deepspeed.zero.GatheredParameters`` under ZeRO-3. Buffers
    come from rank 0. The extra accelerator memory is one bucket on rank 0
    (the largest parameter on the per-parameter path).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (or a plain ``nn.Module``).
        dtype: floating tensors are cast to this (``"fp32"``, ``"bf16"``,
            ``"fp16"``); integer buffers keep their dtype.
        bucket_mb: megabytes rank 0 receives per collective.

    Returns:
        On rank 0, an ordered ``dict[str, Tensor]`` on CPU whose keys are exactly
        ``engine.module.state_dict().keys()``; tied keys map to one tensor.
        ``None`` on every other rank.
    """
    module = unwrap_model(engine)
    masters = unpartitioned_masters(engine)
    copy = _RankZeroCopies(resolve_dtype(dtype), enabled=is_rank0())
    started = time.perf_counter()
    entries = module.state_dict(keep_vars=True)
    params = _unique_parameters(entries, masters)
    with torch.no_grad():
        bucketed = gather_partitions(engine, params, copy.target, int(bucket_mb * 2**20), copy.record)
    gathered: dict[int, torch.Tensor | None] = {
        id(params[i]): bucketed.tensors.get(i) for i in bucketed.indices
    }
    result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    # Tied weights are one Parameter object under several keys: gather it once
    # and reuse the CPU copy, so the file stores it once, as torch.save would.
    with torch.no_grad():
        for key, tensor in entries.items():
            ident = id(tensor)
            if ident not in gathered:
                gathered[ident] = _gather_to_rank0(key, tensor, masters.get(ident), copy)
            result[key] = gathered[ident]
    copy.raise_if_failed()
    if not copy.enabled:
        return None
    _log_summary(result, time.perf_counter() - started)
    return result


def _unique_parameters(entries: dict, masters: dict[int, torch.Tensor]) -> list[nn.Parameter]:
    """The parameters DeepSpeed may partition, each once (tied keys share one), in state_dict order."""
    unique = {id(t): t for t in entries.values() if isinstance(t, nn.Parameter) and id(t) not in masters}
    return list(unique.values())


class _RankZeroCopies:
    """Rank 0's host copies of the gathered tensors, and this rank's first failure.

    A failure here (host memory exhausted, say) must not leave the other ranks
    alone in the next collective: it is recorded, the loop goes on with the
    collectives only, and it is raised once every rank has left the loop.
    """

    def __init__(self, target: torch.dtype, enabled: bool) -> None:
        self.target = target
        self.enabled = enabled
        self.error: tuple[str, Exception] | None = None

    def __call__(self, key: str, tensor: torch.Tensor, fresh: bool) -> torch.Tensor | None:
        if not self.enabled or self.error is not None:
            return None
        try:
            return _to_cpu(tensor, self.target, fresh)
        except Exception as e:
            self.record(f"copying '{key}' to host memory", e)
            return None

    def record(self, what: str, error: Exception) -> None:
        if self.error is None:
            self.error = (what, error)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            what, e = self.error
            raise ConsolidationError(f"rank {get_rank()}: {what} failed: {describe(e)}") from e


def unpartitioned_masters(engine: Any) -> dict[int, torch.Tensor]:
    """``id(param) -> fp32 master`` for DeepSpeed's FP16_Optimizer family.

    Without ZeRO, bf16/fp16 training wraps the optimizer in ``FP16_Optimizer``
    (flat fp32 groups) or ``FP16_UnfusedOptimizer`` (one fp32 copy per
    parameter). Neither links its parameters for ``safe_get_full_fp32_param``,
    which would then return ``None`` and leave only the 16-bit weights.
    """
    optimizer = getattr(engine, "optimizer", None)
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    if hasattr(optimizer, "fp32_groups_flat"):
        return _split_flat_groups(groups, optimizer.fp32_groups_flat)
    if hasattr(optimizer, "fp32_groups"):
        return {id(p): m for params, fp32 in zip(groups, optimizer.fp32_groups) for p, m in zip(params, fp32)}
    return {}


def _split_flat_groups(groups: list[list[torch.Tensor]], flats: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    # The flat buffer is torch's _flatten_dense_tensors of the group: the
    # parameters back to back, in order, without padding.
    masters = {}
    for params, flat in zip(groups, flats):
        offset = 0
        for p in params:
            masters[id(p)] = flat.narrow(0, offset, p.numel()).view(p.shape)
            offset += p.numel()
    return masters


def _gather_to_rank0(
    key: str, tensor: torch.Tensor, master: torch.Tensor | None, copy: _RankZeroCopies
) -> torch.Tensor | None:
    """Collective for parameters: the full value of one entry as a CPU tensor on rank 0."""
    try:
        if master is not None:
            return copy(key, master, fresh=False)
        if isinstance(tensor, nn.Parameter):
            return _gather_parameter(key, tensor, copy)
        # Buffers are never partitioned; rank 0's copy is the one to keep
        # (BatchNorm statistics differ between ranks).
        return copy(key, tensor, fresh=False)
    except Exception as e:
        raise ConsolidationError(
            f"rank {get_rank()}: gathering '{key}' (shape {list(full_shape(tensor))}) failed: {e}"
        ) from e


def _gather_parameter(key: str, param: nn.Parameter, copy: _RankZeroCopies) -> torch.Tensor | None:
    """Collective: the fp32 master weight if DeepSpeed holds one, else the module's full value."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is not None:
        return copy(key, master.view(full_shape(param)), fresh=True)
    if hasattr(param, "ds_id"):
        # A ZeRO-3 parameter without a master copy (frozen): materialise it
        # from the partitions, in training precision, while the context lasts.
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters([param], modifier_rank=None):
            return copy(key, param.data, fresh=False)
    # ZeRO-0/1/2 keep every parameter whole on every rank.
    return copy(key, param, fresh=False)


def _to_cpu(tensor: torch.Tensor, target: torch.dtype, fresh: bool) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage.

    ``fresh`` says the tensor is already a private buffer (a gather result);
    anything else may be a view into DeepSpeed's flat buffer (which torch.save
    would write whole) and keeps changing as training goes on, so it is copied.
    """
    dtype = target if tensor.is_floating_point() else tensor.dtype
    owns_storage = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    out = tensor.detach().to(device="cpu", dtype=dtype, copy=not (fresh and owns_storage))
    return out.contiguous()


def _log_summary(state_dict: "OrderedDict[str, torch.Tensor]", seconds: float) -> None:
    storages = {t.untyped_storage().data_ptr(): t for t in state_dict.values()}
    nbytes = sum(t.numel() * t.element_size() for t in storages.values())
    logger.info(
        "consolidated %d tensors (%d unique, %.1f MB) in %.2f s",
        len(state_dict),
        len(storages),
        nbytes / 1e6,
        seconds,
    )
