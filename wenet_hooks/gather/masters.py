"""Where DeepSpeed keeps the fp32 master weights.

Partitioned (ZeRO-1/2/3 and the bf16 optimizer), :func:`find_partitions`:

ZeRO-1/2 (and DeepSpeed's bf16 optimizer) hold one flat fp32 partition per
parameter group on each rank, and link every parameter to the slice of it
that this rank owns (``param._hp_mapping``). ZeRO-3 holds one flat fp32
buffer per sub-group, each parameter's partition at a recorded offset
(``optimizer.grad_position``). Both reduce to the same description: flat
buffers of equal length on every rank, and fragments saying which elements of
which parameter sit where in them. :mod:`wenet_hooks.gather.bucketed` moves the flat
buffers in a few large collectives and places the fragments on rank 0.

DeepSpeed keeps each optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``) in
flat tensors of exactly the masters' layout, keyed by the flat master in its
base optimizer's ``state``: :func:`optimizer_state_partitions` describes them
with the same fragments.

Unpartitioned (bf16/fp16 without ZeRO), :func:`unpartitioned_masters`.

Anything this module does not recognise (NVMe-swapped optimizer states, a
process group that is not the whole world) yields ``None``, and the caller
falls back to DeepSpeed's per-parameter ``safe_get_full_fp32_param``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from wenet_hooks.dist import is_distributed
from wenet_hooks.errors import ConsolidationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fragment:
    """Elements ``[start, start + numel)`` of parameter ``param`` (flattened),
    found at ``[offset, offset + numel)`` of flat buffer ``group`` on one rank."""

    group: int
    param: int
    start: int
    offset: int
    numel: int


@dataclass
class Partitions:
    """This rank's flat fp32 buffers and the fragments they hold."""

    flats: list[torch.Tensor]
    fragments: list[Fragment]
    process_group: Any


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The tensor's real shape: ZeRO-3 leaves an empty placeholder in the module (``ds_shape`` is the real one)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def full_numel(tensor: torch.Tensor) -> int:
    """The tensor's real number of elements (see :func:`full_shape`)."""
    return getattr(tensor, "ds_numel", tensor.numel())


def find_partitions(engine: Any, params: Sequence[torch.nn.Parameter]) -> Optional[Partitions]:
    """This rank's fp32 partitions of ``params``, or ``None`` if the layout is not one we know."""
    if not is_distributed():
        return None
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        parts = _zero3_partitions(optimizer, params)
    else:
        parts = _linked_partitions(optimizer, params)
    if parts is None or not _spans_world(parts.process_group):
        return None
    if any(flat.dtype != torch.float32 for flat in parts.flats):
        return None  # masters kept in 16 bits (DeepSpeed's bf16 master option): not what we move
    return parts


def find_partitions_quietly(engine: Any, params: Sequence[torch.nn.Parameter]) -> Optional[Partitions]:
    """:func:`find_partitions`, with any error read as "unknown layout": a collective follows, which
    every rank must reach."""
    try:
        return find_partitions(engine, params)
    except Exception:
        logger.warning("wenet_hooks: could not read DeepSpeed's fp32 partitions here", exc_info=True)
        return None


def unwrap_model(engine: Any) -> torch.nn.Module:
    """The user's model inside a DeepSpeed engine (or the module itself)."""
    module = getattr(engine, "module", engine)
    if not isinstance(module, torch.nn.Module):
        raise ConsolidationError(
            f"expected a DeepSpeed engine or a torch.nn.Module; found {type(engine).__name__}"
        )
    return module


def zero_stage(engine: Any) -> int:
    """The engine's ZeRO stage (0 for a plain module)."""
    return int(getattr(engine, "zero_optimization_stage", lambda: 0)())


def base_optimizer(engine: Any) -> Any:
    """The torch (or DeepSpeed CPU/fused) optimizer that holds the state, inside DeepSpeed's wrapper."""
    wrapper = getattr(engine, "optimizer", None)
    return getattr(wrapper, "optimizer", wrapper)


def optimizer_state_partitions(engine: Any, parts: Partitions, key: str) -> Optional[Partitions]:
    """This rank's partitions of optimizer state ``key``: same fragments, the state's flat tensors.

    ``None`` when a flat master has no such state tensor of its own shape
    (no step taken yet, or a state kept elsewhere).
    """
    state = getattr(base_optimizer(engine), "state", {})
    flats = []
    for flat in parts.flats:
        value = state.get(flat, {}).get(key) if flat in state else None
        if not (torch.is_tensor(value) and value.shape == flat.shape):
            return None
        flats.append(value)
    return Partitions(flats, parts.fragments, parts.process_group)


def _linked_partitions(optimizer: Any, params: Sequence[torch.nn.Parameter]) -> Optional[Partitions]:
    """ZeRO-1/2 and the bf16 optimizer: fragments from each parameter's ``_hp_mapping``."""
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = getattr(optimizer, "fp32_groups_flat_partition", None)
    groups = getattr(optimizer, "real_dp_process_group", None)
    if not flats or not groups:
        return None
    fragments = []
    for index, param in enumerate(params):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        group, lp, hp = mapping.param_group_index, mapping.lp_fragment_address, mapping.hp_fragment_address
        # The mapping's slice must be where we are about to read; if DeepSpeed
        # ever lays it out differently, take the slow path rather than guess.
        expected = flats[group].narrow(0, hp.start, hp.numel)
        if mapping.hp_fragment.data_ptr() != expected.data_ptr():
            return None
        fragments.append(Fragment(group, index, lp.start, hp.start, hp.numel))
    return Partitions(list(flats), fragments, _one_group(groups))


def _zero3_partitions(optimizer: Any, params: Sequence[torch.nn.Parameter]) -> Optional[Partitions]:
    """ZeRO-3: rank r holds elements ``[r * n, (r + 1) * n)`` of each parameter, n its partition size."""
    if getattr(optimizer, "swap_optimizer", False):
        return None
    positions = getattr(optimizer, "grad_position", None)
    group = getattr(optimizer, "dp_process_group", None)
    if positions is None:
        return None
    rank = dist.get_rank(group=group)
    fragments = []
    for index, param in enumerate(params):
        if not hasattr(param, "ds_id"):
            continue
        position = positions.get(optimizer.get_param_id(param))
        if position is None:
            continue
        if not _same_ranks(getattr(param, "ds_process_group", group), group):
            return None
        group_index, offset, partition_numel = position
        start = rank * partition_numel
        numel = min(partition_numel, param.ds_numel - start)
        if numel > 0:
            fragments.append(Fragment(group_index, index, start, offset, numel))
    return Partitions(list(optimizer.fp32_partitioned_groups_flat), fragments, group)


def _one_group(groups: Sequence[Any]) -> Any:
    first = groups[0]
    return first if all(_same_ranks(g, first) for g in groups) else _DIFFERENT_GROUPS


# A marker that never spans the world: parameter groups on different process
# groups (expert parallelism) are left to DeepSpeed's own per-parameter path.
_DIFFERENT_GROUPS = object()


def _spans_world(group: Any) -> bool:
    return group is not _DIFFERENT_GROUPS and _same_ranks(group, None)


def _same_ranks(a: Any, b: Any) -> bool:
    return a is b or _ranks(a) == _ranks(b)


def _ranks(group: Any) -> list[int]:
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


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
