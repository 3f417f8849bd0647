"""Gather a DeepSpeed engine's optimizer state onto rank 0, under the model's own key names.

Everything DeepSpeed's own ``load_checkpoint`` would restore for a resume to
be exact, independent of world size and ZeRO stage: each trainable
parameter's state tensors in full fp32 (Adam's ``exp_avg`` and
``exp_avg_sq``), the step, the param groups' hyperparameters, the learning
rate scheduler's state, the engine's step counters and, under fp16, the loss
scaler. The state tensors lie in flat partitions of the fp32 masters' layout
and move with the same bucketed collectives (:mod:`wenet_hooks.gather.bucketed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from wenet_hooks.dist import get_rank, get_world_size, is_rank0
from wenet_hooks.errors import ConsolidationError
from wenet_hooks.file.optimizer_file import ENGINE_COUNTERS, LOSS_SCALER_FIELDS, plain
from wenet_hooks.gather.bucketed import DEFAULT_BUCKET_MB, gather_partitions
from wenet_hooks.gather.masters import base_optimizer, find_partitions
from wenet_hooks.gather.per_param import HostCopies

# Optimizers whose state has the same meaning (Adam's two moments and a step):
# a file written under one resumes under another.
ADAM_FAMILY = ("Adam", "AdamW", "FusedAdam", "DeepSpeedCPUAdam", "DeepSpeedCPUAdamW")


def optimizer_family(name: str) -> str:
    """``"adam"`` for every Adam-like optimizer, else the class name itself."""
    return "adam" if name in ADAM_FAMILY else name


@dataclass
class GatheredOptimizer:
    """Rank 0's copy of the optimizer state, keyed by the model's parameter names."""

    state: dict[str, dict[str, torch.Tensor]]  # param key -> state key -> full fp32 tensor
    meta: dict[str, Any] = field(default_factory=dict)  # plain data: step, param groups, scheduler...


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Each trainable parameter once (tied ones under their first key), in ``state_dict()`` order."""
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad and id(tensor) not in found:
            found[id(tensor)] = (key, tensor)
    return dict(found.values())


def consolidate_optimizer(engine: Any, bucket_mb: float = DEFAULT_BUCKET_MB) -> Optional[GatheredOptimizer]:
    """Collective: must be called on all ranks. The optimizer state on rank 0; ``None`` elsewhere.

    Raises:
        ConsolidationError: the optimizer's state is not laid out as DeepSpeed's
            ZeRO-1/2/3 or bf16 optimizer keeps it, or gathering it failed.
    """
    module = getattr(engine, "module", engine)
    params = trainable_parameters(module)
    keys = _agreed_state_keys(engine, list(params.values()))
    copy = HostCopies(torch.float32, enabled=is_rank0())
    state: dict[str, dict[str, torch.Tensor]] = {key: {} for key in params}
    ordered = list(params.values())
    with torch.no_grad():
        for state_key in keys:
            gathered = gather_partitions(engine, ordered, torch.float32, int(bucket_mb * 2**20),
                                         copy.record_failure, state_key=state_key)
            if len(gathered.indices) != len(ordered):
                raise ConsolidationError(
                    f"rank {get_rank()}: optimizer state '{state_key}' is not in the flat layout of DeepSpeed's "
                    "ZeRO-1/2/3 or bf16 optimizer (NVMe-swapped states, ZeRO-0?); HINT: its sharded checkpoint "
                    "holds it; set save_states: model+optimizer with keep_sharded: all")
            for index, name in enumerate(params):
                if copy.enabled:
                    state[name][state_key] = gathered.tensors[index]
    copy.raise_if_failed()
    if not copy.enabled:
        return None
    return GatheredOptimizer(state, _meta(engine, list(params), keys))


def _agreed_state_keys(engine: Any, params: list[nn.Parameter]) -> list[str]:
    """Collective: the state tensors every rank keeps per flat partition (none before the first step)."""
    parts = find_partitions(engine, params)
    state = getattr(base_optimizer(engine), "state", {})
    mine: Optional[list[str]] = None
    if parts is not None:
        first = state.get(parts.flats[0], {}) if parts.flats else {}
        mine = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.shape == parts.flats[0].shape)
    reports = _all_reports(mine)
    if any(r is None for r in reports) or any(r != reports[0] for r in reports):
        raise ConsolidationError(
            f"rank {get_rank()}: the ranks do not keep their optimizer state in DeepSpeed's partitioned layout "
            f"alike (state keys per rank: {reports}); HINT: the sharded checkpoint holds it")
    return reports[0]


def _all_reports(mine: Any) -> list[Any]:
    if get_world_size() == 1:
        return [mine]
    import torch.distributed as dist

    reports: list[Any] = [None] * get_world_size()
    dist.all_gather_object(reports, mine)
    return reports


def _meta(engine: Any, names: list[str], keys: list[str]) -> dict[str, Any]:
    optimizer = base_optimizer(engine)
    wrapper = getattr(engine, "optimizer", None)
    scheduler = getattr(engine, "lr_scheduler", None)
    scaler = getattr(wrapper, "loss_scaler", None)
    return {
        "optimizer": type(optimizer).__name__,
        "params": names,
        "state_keys": keys,
        "step": optimizer_step(optimizer),
        # Hyperparameters only: the groups' own counters ("step" of fused Adam) are the step above.
        "param_groups": [{k: plain(v) for k, v in group.items() if k not in ("params", "step")}
                         for group in optimizer.param_groups],
        "lr_scheduler": plain(scheduler.state_dict()) if scheduler is not None else None,
        "engine": {name: int(getattr(engine, name)) for name in ENGINE_COUNTERS if hasattr(engine, name)},
        "loss_scaler": ({f: plain(getattr(scaler, f)) for f in LOSS_SCALER_FIELDS if hasattr(scaler, f)}
                        if scaler is not None else None),
        "world_size": get_world_size(),
        "zero_stage": int(getattr(engine, "zero_optimization_stage", lambda: 0)()),
    }


def optimizer_step(optimizer: Any) -> float:
    """The optimizer's step count: in each flat's state (torch, CPU Adam) or its group (fused Adam)."""
    for values in getattr(optimizer, "state", {}).values():
        if "step" in values:
            return float(values["step"])
    for group in optimizer.param_groups:
        if "step" in group:
            return float(group["step"])
    return 0.0
