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

from wenet_hooks.dist import all_reports, get_rank, get_world_size, is_rank0
from wenet_hooks.errors import ConsolidationError
from wenet_hooks.file.optimizer_file import ENGINE_COUNTERS, LOSS_SCALER_FIELDS, plain
from wenet_hooks.gather.bucketed import DEFAULT_BUCKET_MB, PendingGather, prepare_gather
from wenet_hooks.gather.masters import base_optimizer, find_partitions_quietly, unwrap_model, zero_stage
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

    Call :func:`optimizer_unavailable` first: every rank must keep its state in
    DeepSpeed's partitioned layout.

    Raises:
        ConsolidationError: gathering it failed on this rank (after every
            collective ran on every rank).
    """
    return prepare_optimizer(engine, bucket_mb).finish()


@dataclass
class PendingOptimizer:
    """The optimizer state as it was at :func:`prepare_optimizer`; :meth:`finish` moves it to rank 0."""

    names: list[str]  # the trainable parameters' keys, in the gathers' index order
    gathers: dict[str, PendingGather]  # state key -> its prepared gather
    copy: HostCopies
    meta: dict[str, Any]

    def finish(self) -> Optional[GatheredOptimizer]:
        """Collective over the group it was prepared with: the state on rank 0, ``None`` elsewhere.

        Raises:
            ConsolidationError: something failed on this rank (after every collective ran).
        """
        state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.names}
        for state_key, pending in self.gathers.items():
            gathered = pending.run()
            for index, name in enumerate(self.names):
                if self.copy.enabled and index in gathered.tensors:  # absent: a failure, raised below
                    state[name][state_key] = gathered.tensors[index]
        self.copy.raise_if_failed()
        return GatheredOptimizer(state, self.meta) if self.copy.enabled else None


def prepare_optimizer(engine: Any, bucket_mb: float = DEFAULT_BUCKET_MB,
                      background_group: Any = None) -> PendingOptimizer:
    """Collective: agree on the layout, take the meta (step, scheduler...) now, allocate.

    With ``background_group``, every rank also copies its partitions of the
    state to host memory now, so :meth:`PendingOptimizer.finish` can run in
    the background while training steps on (see
    :func:`wenet_hooks.gather.bucketed.prepare_gather`).

    Raises:
        ConsolidationError: the state is not in DeepSpeed's flat layout (on every rank alike).
    """
    module = unwrap_model(engine)
    params = trainable_parameters(module)
    parts = find_partitions_quietly(engine, list(params.values()))
    keys = _state_keys(engine, parts) if parts is not None else []  # agreed by optimizer_unavailable
    copy = HostCopies(torch.float32, enabled=is_rank0())
    ordered = list(params.values())
    gathers = {}
    with torch.no_grad():
        for state_key in keys:
            pending = prepare_gather(engine, ordered, torch.float32, int(bucket_mb * 2**20), copy.record_failure,
                                     state_key=state_key, background_group=background_group)
            if len(pending.indices) != len(ordered):  # the layout every rank agreed on
                raise ConsolidationError(
                    f"rank {get_rank()}: optimizer state '{state_key}' is not in the flat layout of DeepSpeed's "
                    "ZeRO-1/2/3 or bf16 optimizer (NVMe-swapped states, ZeRO-0?); HINT: its sharded checkpoint "
                    "holds it; set save_states: model+optimizer with keep_sharded: all")
            gathers[state_key] = pending
    return PendingOptimizer(list(params), gathers, copy, _meta(engine, list(params), keys) if copy.enabled else {})


def optimizer_unavailable(engine: Any) -> Optional[str]:
    """Collective: why this engine's optimizer state cannot be gathered, agreed by every rank; None if it can.

    It must lie in DeepSpeed's partitioned layout (ZeRO-1/2/3, the bf16
    optimizer), in memory, with the same state keys on every rank.
    """
    module = unwrap_model(engine)
    parts = find_partitions_quietly(engine, list(trainable_parameters(module).values()))
    mine: Any = "a layout wenet_hooks does not know (ZeRO-0, NVMe-swapped optimizer states)"
    if parts is not None:
        mine = _state_keys(engine, parts)
    reports = all_reports(mine)
    if any(isinstance(r, str) for r in reports):
        return f"the optimizer state is kept in {next(r for r in reports if isinstance(r, str))}"
    if any(r != reports[0] for r in reports):
        return f"the ranks keep different optimizer states ({reports})"
    return None


def _state_keys(engine: Any, parts: Any) -> list[str]:
    """The state tensors kept per flat partition, in the partitions' own shape (none before the first step)."""
    state = getattr(base_optimizer(engine), "state", {})
    first = state.get(parts.flats[0], {}) if parts.flats else {}
    return sorted(k for k, v in first.items() if torch.is_tensor(v) and v.shape == parts.flats[0].shape)


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
        "zero_stage": zero_stage(engine),
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
