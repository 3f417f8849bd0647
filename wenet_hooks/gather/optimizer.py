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
from typing import Any, Optional, Union

import torch

from wenet_hooks.dist import get_rank, get_world_size, is_rank0
from wenet_hooks.errors import ConsolidationError
from wenet_hooks.file.optimizer_file import (
    LOSS_SCALER_FIELDS,
    META_KEY,
    file_entries,
    file_key,
    meta_tensor,
    plain,
)
from wenet_hooks.file.writer import Entry, InMemory
from wenet_hooks.gather.agreement import AgreedLayout, agree
from wenet_hooks.gather.bucketed import DEFAULT_BUCKET_MB, OnFragment, PendingGather, Write, WritePart, prepare_gather
from wenet_hooks.gather.masters import EngineView, Partitions, full_shape, inspect_engine
from wenet_hooks.gather.per_param import ToHost
from wenet_hooks.gather.staging import Staging

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


def consolidate_optimizer(engine: Any, bucket_mb: float = DEFAULT_BUCKET_MB) -> Optional[GatheredOptimizer]:
    """Collective: must be called on all ranks. The optimizer state on rank 0; ``None`` elsewhere.

    Raises:
        ConsolidationError: the ranks do not all keep it in DeepSpeed's partitioned layout, or
            allocating failed on some rank (on every rank alike, before the gather); or gathering it
            failed on this rank (after every collective ran on every rank).
    """
    view = inspect_engine(engine)
    agreed, reports = agree(view.partitions, view.params, view.state.agreed,
                            state_keys(view.partitions, view.optimizer, view.wrapper))
    keys = agreed_state_keys(reports)
    if isinstance(keys, str):
        raise ConsolidationError(f"the optimizer state cannot be gathered: {keys}")
    pending = prepare_optimizer(view, agreed, keys, bucket_mb)
    try:
        pending.host.raise_if_failed_anywhere()  # every rank allocated its part, or none gathers
    except ConsolidationError:
        pending.release()
        raise
    return pending.in_memory()


@dataclass
class PendingOptimizer:
    """The optimizer state as it was at :func:`prepare_optimizer`; :meth:`finish` moves it to rank 0."""

    names: dict[int, str]  # layout index -> key of each trainable parameter, in state_dict order
    gathers: dict[str, PendingGather]  # state key -> its prepared gather
    host: ToHost
    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # each trainable parameter's full shape, by key

    def entries(self) -> list[Entry]:
        """The optimizer file these states make (rank 0: the meta is known there)."""
        return file_entries(self.shapes, list(self.gathers), meta_tensor(self.meta))

    def finish(self, write: Optional[Write], write_part: Optional[WritePart]) -> None:
        """Collective over the group it was prepared with: on rank 0, each fragment of each state goes to
        ``write_part(file key, start, values)`` as it arrives, then the meta to ``write`` (a sink's
        ``receive_part`` and ``receive``); elsewhere both are None.

        Raises:
            ConsolidationError: something failed on this rank (after every collective ran).
        """
        for state_key, pending in self.gathers.items():  # every gather's collectives run, whatever failed
            pending.run(None if write_part is None else self._placing(state_key, write_part))
        self.host.raise_if_failed()
        if write is not None and self.host.enabled:
            write(META_KEY, meta_tensor(self.meta))

    def release(self) -> None:
        """Every state's gather's buffers freed (idempotent): never run, or run already."""
        for pending in self.gathers.values():
            pending.release()

    def in_memory(self) -> Optional[GatheredOptimizer]:
        """Collective: :meth:`finish` into rank 0's memory (the state under the model's keys); None elsewhere."""
        sink = InMemory(self.entries()) if self.host.enabled else None
        self.finish(sink and sink.receive, sink and sink.receive_part)
        if sink is None:
            return None
        keys = list(self.gathers)
        return GatheredOptimizer({name: {key: sink.values[file_key(key, name)] for key in keys}
                                  for name in self.names.values()}, self.meta)

    def _placing(self, state_key: str, write_part: WritePart) -> OnFragment:
        return lambda index, start, values: write_part(file_key(state_key, self.names[index]), start, values)


def prepare_optimizer(view: EngineView, agreed: Optional[AgreedLayout], keys: list[str],
                      bucket_mb: float = DEFAULT_BUCKET_MB, background_group: Any = None,
                      staging: Optional[Staging] = None) -> PendingOptimizer:
    """Take the meta (step, scheduler...) now, allocate the gather of each state in ``keys``
    (:func:`agreed_state_keys`: the same on every rank) in the layout every rank ``agreed`` on.

    With ``background_group``, every rank also copies its partitions of the
    state to host memory now, so :meth:`PendingOptimizer.finish` can run in
    the background while training steps on (see
    :func:`wenet_hooks.gather.bucketed.prepare_gather`); with ``staging``, when it runs.

    Raises:
        ConsolidationError: the state is not in DeepSpeed's flat layout (on every rank alike).
    """
    names = {i: view.names[i] for i in view.trainable}
    host = ToHost(torch.float32, enabled=is_rank0())
    state = getattr(view.optimizer, "state", {})
    gathers = {}
    with torch.no_grad():
        for state_key in keys:
            parts = view.partitions.of_state(state, state_key) if view.partitions is not None else None
            pending = prepare_gather(parts, agreed, torch.float32, int(bucket_mb * 2**20), host.failure,
                                     state_key=state_key, background_group=background_group, staging=staging,
                                     pool=view.state.pool)
            if pending.indices != set(names):  # the layout every rank agreed on
                raise ConsolidationError(
                    f"rank {get_rank()}: optimizer state '{state_key}' is not in the flat layout of DeepSpeed's "
                    "ZeRO-1/2/3 or bf16 optimizer for every trainable parameter (NVMe-swapped states, ZeRO-0?); "
                    "HINT: its sharded checkpoint holds it; set save_states: model+optimizer with keep_sharded: all")
            gathers[state_key] = pending
    shapes = {name: tuple(full_shape(view.params[i])) for i, name in names.items()}
    return PendingOptimizer(names, gathers, host, _meta(view, list(names.values()), keys) if host.enabled else {},
                            shapes)


def agreed_state_keys(reports: list[Union[list[str], str]]) -> Union[list[str], str]:
    """Every rank's :func:`state_keys`, agreed: the keys every rank keeps, or why the state cannot be
    gathered (the same on every rank, which all read the same reports)."""
    if any(isinstance(r, str) for r in reports):
        return f"the optimizer state is kept in {next(r for r in reports if isinstance(r, str))}"
    if any(r != reports[0] for r in reports):
        return f"the ranks keep different optimizer states ({reports})"
    return reports[0]


def state_keys(parts: Optional[Partitions], optimizer: Any, wrapper: Any) -> Union[list[str], str]:
    """The state tensors ``optimizer`` (the base optimizer, inside DeepSpeed's ``wrapper``) keeps for every
    flat partition of ``parts``, in the partitions' own shape (none before the first step), or where else
    the state is kept (a reason why it cannot be gathered)."""
    if parts is None:
        return "a layout wenet_hooks does not know (ZeRO-0, NVMe-swapped optimizer states)"
    elsewhere = _kept_elsewhere(wrapper)
    if elsewhere:
        return elsewhere
    state = getattr(optimizer, "state", {})
    per_flat = [sorted(k for k, v in state.get(flat, {}).items() if torch.is_tensor(v) and v.shape == flat.shape)
                for flat in parts.flats]
    if any(keys != per_flat[0] for keys in per_flat):
        return "a place wenet_hooks does not read for some of its flat partitions (their state keys differ)"
    step = optimizer_step(optimizer)
    if per_flat and not per_flat[0] and step > 0:
        return (f"a place wenet_hooks does not read: {type(optimizer).__name__} has taken {step:g} steps "
                "but its state holds no tensor shaped like DeepSpeed's flat partitions")
    return per_flat[0] if per_flat else []


def _kept_elsewhere(wrapper: Any) -> Optional[str]:
    """Optimizer state DeepSpeed (its optimizer ``wrapper``) keeps outside the base optimizer's ``state``."""
    if "SuperOffload" in type(wrapper).__name__:
        return "another process (DeepSpeed's SuperOffload)"
    backup = getattr(wrapper, "backup_optimizer", None)
    devices = getattr(wrapper, "subgroup_to_device", None) or {}
    if backup is not None and any(device != "cpu" for device in devices.values()):
        return ("two optimizers (ZeRO-3 offload_optimizer.ratio < 1: the sub-groups kept on the accelerator step "
                "with DeepSpeed's backup optimizer)")
    return None


def _meta(view: EngineView, names: list[str], keys: list[str]) -> dict[str, Any]:
    optimizer, scheduler = view.optimizer, view.scheduler
    scaler = getattr(view.wrapper, "loss_scaler", None)
    return {
        "optimizer": type(optimizer).__name__,
        "params": names,
        "state_keys": keys,
        "step": optimizer_step(optimizer),
        # Hyperparameters only: the groups' own counters ("step" of fused Adam) are the step above.
        "param_groups": [{k: plain(v) for k, v in group.items() if k not in ("params", "step")}
                         for group in optimizer.param_groups],
        "lr_scheduler": plain(scheduler.state_dict()) if scheduler is not None else None,
        "engine": view.counters,
        "loss_scaler": ({f: plain(getattr(scaler, f)) for f in LOSS_SCALER_FIELDS if hasattr(scaler, f)}
                        if scaler is not None else None),
        "world_size": get_world_size(),
        "zero_stage": view.stage,
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
