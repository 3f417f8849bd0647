"""The fp32 masters of DeepSpeed's FP16_Optimizer family (bf16/fp16 training without ZeRO): not partitioned,
one copy on every rank, and not linked to their parameters for ``safe_get_full_fp32_param``."""

from __future__ import annotations

from typing import Any

import torch


def unpartitioned_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """``id(param) -> fp32 master`` for DeepSpeed's FP16_Optimizer family.

    Without ZeRO, bf16/fp16 training wraps the optimizer in ``FP16_Optimizer``
    (flat fp32 groups) or ``FP16_UnfusedOptimizer`` (one fp32 copy per
    parameter). Neither links its parameters for ``safe_get_full_fp32_param``,
    which would then return ``None`` and leave only the 16-bit weights.
    """
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None or hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3 names its groups so too
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
