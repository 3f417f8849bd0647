"""Where DeepSpeed keeps the fp32 master weights: the one place that reads its layout.

:func:`inspect_engine` looks at the engine once per save (or restore) and
returns an :class:`EngineView`; the weights' gather, the optimizer state's
gather and the restore all read that one description.

Partitioned (ZeRO-1/2/3 and DeepSpeed's bf16 optimizer), each rank holds flat
fp32 buffers and the layout reduces to :class:`Fragment` s: which elements of
which parameter sit where in which flat buffer. They are derived from where
the data really is, not from DeepSpeed's bookkeeping alone:

- ZeRO-1/2 (and the bf16 optimizer): each training weight is a view into the
  group's flat 16-bit (or fp32) buffer; rank r's fp32 partition is a copy of
  elements ``[r * n, (r + 1) * n)`` of that buffer. A parameter's place is its
  weight's offset in the buffer. DeepSpeed's own per-parameter mapping
  (``param._hp_mapping``, which ``safe_get_full_fp32_param`` reads) is only
  cross-checked: with ``round_robin_gradients`` it is linked in the groups'
  original order while the buffer is built in round-robin order, so it points
  at other parameters' values.
- ZeRO-3: rank r holds elements ``[r * n, (r + 1) * n)`` of each parameter,
  n its partition size; the partition (``param.ds_tensor``) is a view into the
  sub-group's flat buffer, and the fp32 flat buffer is a copy of that one.
  Cross-checked against ``optimizer.grad_position``.

Each fragment also carries the training weight's elements it must equal
(:mod:`wenet_hooks.gather.check`). Optimizer states (Adam's ``exp_avg``...)
lie in flat tensors of the masters' own layout, keyed by the flat master in
the base optimizer's ``state`` (:meth:`Partitions.of_state`).

Unpartitioned (bf16/fp16 without ZeRO): :mod:`wenet_hooks.gather.fp16_masters`.
Anything not recognised (NVMe-swapped optimizer states, a process group that
is not the whole world) has no partitions, and the gather falls back to
DeepSpeed's per-parameter ``safe_get_full_fp32_param``.

What the package keeps for an engine between its saves (the host buffers its
background gathers send, the guard that holds its next optimizer step, the
layout its ranks last agreed on) is one :class:`EngineState` in a weak
registry here, handed to each save in its view (:attr:`EngineView.state`) and
dropped, with whatever it installed on the engine undone, when the engine is
collected.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from wenet_hooks.dist import is_distributed
from wenet_hooks.errors import ConsolidationError
from wenet_hooks.file.optimizer_file import ENGINE_COUNTERS
from wenet_hooks.gather.fp16_masters import unpartitioned_masters
from wenet_hooks.gather.snapshots import SnapshotPool

logger = logging.getLogger(__name__)
_said: set[str] = set()  # warnings already logged in this process


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
    """This rank's flat buffers, the fragments they hold and, for each fragment, the training
    weight's elements (a view) that the fp32 masters must equal once cast to the training dtype."""

    flats: list[torch.Tensor]
    fragments: list[Fragment]
    process_group: Any
    weights: list[torch.Tensor]

    def of_state(self, state: Mapping[Any, Any], key: str) -> Optional[Partitions]:
        """This rank's partitions of optimizer state ``key`` (``state``: the base optimizer's): the same
        fragments over the state's flat tensors. ``None`` when a flat master has no such state tensor of
        its own shape (no step taken yet, or a state kept elsewhere)."""
        flats = []
        for flat in self.flats:
            value = state[flat].get(key) if flat in state else None
            if not (torch.is_tensor(value) and value.shape == flat.shape):
                return None
            flats.append(value)
        return replace(self, flats=flats)


@dataclass
class EngineState:
    """What one engine's saves share, kept between them (one per engine: :func:`state_of`)."""

    pool: SnapshotPool = field(default_factory=SnapshotPool)  # host buffers of its background gathers
    guard: Any = None  # its step guard (staging._StepGuard), once a save deferred its copies
    agreed: list[Any] = field(default_factory=list)  # the layout its ranks last agreed on (agreement.agree)
    undo: list[Callable[[], None]] = field(default_factory=list)  # what to undo when the engine goes

    def forget(self) -> None:
        for undo in self.undo:
            undo()
        self.undo = []
        self.pool.clear()


_STATES: dict[int, EngineState] = {}  # id(engine) -> its state, dropped when the engine is collected


def state_of(engine: Any) -> EngineState:
    """``engine``'s state, made on first use (kept for the process's life if it has no weak references)."""
    key = id(engine)
    if key not in _STATES:
        _STATES[key] = EngineState()
        try:
            weakref.finalize(engine, _forget, key)
        except TypeError:
            pass
    return _STATES[key]


def known_state(engine: Any) -> Optional[EngineState]:
    """``engine``'s state if a save made one, else None (nothing is made)."""
    return _STATES.get(id(engine))


def _forget(key: int) -> None:
    state = _STATES.pop(key, None)
    if state is not None:
        state.forget()


@dataclass
class EngineView:
    """One save's view of a DeepSpeed engine (or a plain module), inspected once: everything a save
    reads of the engine (nothing after :func:`inspect_engine` reads the engine itself)."""

    state: EngineState  # what the engine's saves share: host buffers, step guard, last agreement
    module: nn.Module
    entries: dict[str, torch.Tensor]  # state_dict(keep_vars=True): parameters as Parameter objects
    params: list[nn.Parameter]  # each parameter once (tied ones under their first key), state_dict order
    names: list[str]  # the first key of each parameter
    trainable: list[int]  # indices of the parameters the optimizer trains (``requires_grad``)
    masters: dict[int, torch.Tensor]  # id(param) -> unpartitioned fp32 master (FP16_Optimizer)
    partitions: Optional[Partitions]  # None: not partitioned, or a layout this module does not know
    stage: int
    optimizer: Any  # the base optimizer holding the state (torch's, DeepSpeed's CPU or fused Adam)
    wrapper: Any  # DeepSpeed's optimizer around it (ZeRO's, FP16_Optimizer...), or None
    scheduler: Any  # the engine's learning rate scheduler, or None
    counters: dict[str, int]  # the engine's step counters (ENGINE_COUNTERS)
    hint: str  # what to do when DeepSpeed's per-parameter gather reads the wrong slices, if the cause is known
    steppers: list[torch.optim.Optimizer]  # every torch optimizer whose step changes the masters (torch_optimizers)
    writes_in_backward: bool  # the optimizer changes the masters outside its step (SuperOffload, ZenFlow)


def inspect_engine(engine: Any) -> EngineView:
    """Read the engine's layout once (local: no collective). Any error reading DeepSpeed's
    partitions is logged and read as "unknown layout", so every rank still reaches the next
    collective (the ranks then agree on whether to use it)."""
    module = unwrap_model(engine)
    entries = module.state_dict(keep_vars=True)
    unique: dict[int, tuple[str, nn.Parameter]] = {}
    for key, tensor in entries.items():
        if isinstance(tensor, nn.Parameter) and id(tensor) not in unique:
            unique[id(tensor)] = (key, tensor)
    names = [key for key, _ in unique.values()]
    params = [param for _, param in unique.values()]
    wrapper = getattr(engine, "optimizer", None)
    try:
        partitions = find_partitions(wrapper, params)
    except Exception:
        logger.warning("wenet_hooks: could not read DeepSpeed's fp32 partitions here", exc_info=True)
        partitions = None
    counters = {name: int(getattr(engine, name)) for name in ENGINE_COUNTERS if hasattr(engine, name)}
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    return EngineView(state_of(engine), module, entries, params, names, trainable, unpartitioned_masters(wrapper),
                      partitions, zero_stage(engine), base_optimizer(engine), wrapper,
                      getattr(engine, "lr_scheduler", None), counters, _per_parameter_hint(engine),
                      torch_optimizers(engine), writes_masters_during_backward(engine))


def _per_parameter_hint(engine: Any) -> str:
    round_robin = getattr(engine, "zero_round_robin_gradients", None)
    try:
        robin = callable(round_robin) and round_robin()
    except Exception:  # only a hint: never a reason for one rank to leave the others
        return ""
    if robin:
        return ("with round_robin_gradients: true DeepSpeed's safe_get_full_fp32_param (bucket_mb: 0) reads "
                "other parameters' slices; set bucket_mb above 0, which reads where the data is")
    return ""


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The tensor's real shape: ZeRO-3 leaves an empty placeholder in the module (``ds_shape`` is the real one)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def full_numel(tensor: torch.Tensor) -> int:
    """The tensor's real number of elements (see :func:`full_shape`)."""
    return getattr(tensor, "ds_numel", tensor.numel())


def find_partitions(optimizer: Any, params: Sequence[torch.nn.Parameter]) -> Optional[Partitions]:
    """This rank's fp32 partitions of ``params`` in DeepSpeed's ``optimizer`` (the engine's), or ``None``
    if the layout is not one we know."""
    if not is_distributed() or optimizer is None:
        return None
    index_of = {id(p): i for i, p in enumerate(params)}
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        parts = _zero3_partitions(optimizer, index_of)
    else:
        parts = _linked_partitions(optimizer, index_of)
    if parts is None or not _spans_world(parts.process_group):
        return None
    if any(flat.dtype != torch.float32 for flat in parts.flats):
        return None  # masters kept in 16 bits (DeepSpeed's bf16 master option): not what we move
    return parts


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


# Optimizers that write the masters during backward (outside any step a pre-hook can hold): a background save
# of theirs takes its copies at the call. SuperOffload steps its CPU sub-groups in a worker process; ZenFlow
# overwrites the masters in backward_prologue.
WRITE_DURING_BACKWARD = ("SuperOffload", "ZenFlow")


def writes_masters_during_backward(engine: Any) -> bool:
    """Whether ``engine``'s optimizer changes the masters outside its step (SuperOffload, ZenFlow)."""
    wrapper = getattr(engine, "optimizer", None)
    classes = [c.__name__ for c in type(wrapper).__mro__] if wrapper is not None else []
    return any(name.startswith(prefix) for name in classes for prefix in WRITE_DURING_BACKWARD)


def torch_optimizers(engine: Any) -> list[torch.optim.Optimizer]:
    """Every torch optimizer whose step changes ``engine``'s masters or optimizer state: the engine's
    optimizer, DeepSpeed's base optimizer under it, and ZeRO-3's optimizer for the sub-groups it keeps
    on the accelerator (``offload_optimizer.ratio`` < 1)."""
    found: list[torch.optim.Optimizer] = []
    top = getattr(engine, "optimizer", None)
    for candidate in (top, getattr(top, "optimizer", None), getattr(top, "backup_optimizer", None)):
        if isinstance(candidate, torch.optim.Optimizer) and not any(candidate is f for f in found):
            found.append(candidate)
    return found


# (training weights per group, their flat buffers, this rank's fp32 partitions) as DeepSpeed names them:
_LINKED_ATTRIBUTES = (
    ("bit16_groups", "bit16_groups_flat", "single_partition_of_fp32_groups"),  # ZeRO-1/2
    ("bf16_groups", "bf16_groups_flat", "fp32_groups_flat_partition"),  # the bf16 optimizer (ZeRO-0 bf16)
)


def _linked_partitions(optimizer: Any, index_of: dict[int, int]) -> Optional[Partitions]:
    """ZeRO-1/2 and the bf16 optimizer: fragments from each training weight's place in its flat buffer."""
    found = next((names for names in _LINKED_ATTRIBUTES if getattr(optimizer, names[2], None)), None)
    groups = getattr(optimizer, "real_dp_process_group", None)
    if found is None or not groups:
        return None
    weights_of, buffers, hp_flats = (getattr(optimizer, name) for name in found)
    fragments: list[Fragment] = []
    weights: list[torch.Tensor] = []
    disagree: list[int] = []
    for g, (params, buffer, hp_flat) in enumerate(zip(weights_of, buffers, hp_flats)):
        size = buffer.numel() // dist.get_world_size(group=groups[g])
        if hp_flat.numel() != size:
            return None
        first = dist.get_rank(group=groups[g]) * size
        for param in params:
            position = _offset_in(param.data, buffer)
            if position is None or id(param) not in index_of:
                return None
            lo, hi = max(position, first), min(position + param.numel(), first + size)
            fragment = None
            if lo < hi:
                fragment = Fragment(g, index_of[id(param)], lo - position, lo - first, hi - lo)
                fragments.append(fragment)
                weights.append(param.data.view(-1).narrow(0, fragment.start, fragment.numel))
            if not _mapping_agrees(param, fragment):
                disagree.append(index_of[id(param)])
    if disagree:
        _say_once(f"DeepSpeed's own parameter mapping (_hp_mapping, which its safe_get_full_fp32_param reads) "
                  f"disagrees with where {len(disagree)} parameter(s) lie in its flat buffers on this rank "
                  "(round_robin_gradients: true does this); wenet_hooks reads where the data is")
    return Partitions(list(hp_flats), fragments, _one_group(groups), weights)


def _mapping_agrees(param: torch.Tensor, fragment: Optional[Fragment]) -> bool:
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return fragment is None
    if fragment is None:
        return mapping.hp_fragment_address.numel == 0
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    return (mapping.param_group_index, lp.start, hp.start, hp.numel) == (
        fragment.group, fragment.start, fragment.offset, fragment.numel)


def _zero3_partitions(optimizer: Any, index_of: dict[int, int]) -> Optional[Partitions]:
    """ZeRO-3: fragments from each partition's place in its sub-group's flat buffer."""
    if getattr(optimizer, "swap_optimizer", False):
        return None
    buffers = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    sub_groups = getattr(optimizer, "fp16_groups", None)
    group = getattr(optimizer, "dp_process_group", None)
    if not buffers or sub_groups is None or len(buffers) != len(optimizer.fp32_partitioned_groups_flat):
        return None
    rank = dist.get_rank(group=group)
    positions = getattr(optimizer, "grad_position", None) or {}
    fragments, weights, disagree = [], [], []
    for i, (params, buffer) in enumerate(zip(sub_groups, buffers)):
        if buffer is None:  # a sub-group kept on NVMe
            return None
        for param in params:
            partition = getattr(param, "ds_tensor", None)
            position = None if partition is None else _offset_in(partition, buffer)
            if position is None or id(param) not in index_of:
                return None
            if not _same_ranks(getattr(param, "ds_process_group", group), group):
                return None
            size = partition.ds_numel if hasattr(partition, "ds_numel") else partition.numel()
            if positions and positions.get(optimizer.get_param_id(param)) != [i, position, size]:
                disagree.append(index_of[id(param)])
            start = rank * size
            numel = min(size, param.ds_numel - start)
            if numel > 0:
                fragments.append(Fragment(i, index_of[id(param)], start, position, numel))
                weights.append(partition.view(-1).narrow(0, 0, numel))
    if disagree:
        _say_once(f"DeepSpeed's grad_position disagrees with where {len(disagree)} ZeRO-3 partition(s) lie in its "
                  "flat buffers on this rank; wenet_hooks reads where the data is")
    return Partitions(list(optimizer.fp32_partitioned_groups_flat), fragments, group, weights)


def _offset_in(tensor: torch.Tensor, buffer: torch.Tensor) -> Optional[int]:
    """The element offset of ``tensor``'s data inside ``buffer``, or None if it does not lie there."""
    if tensor.dtype != buffer.dtype or tensor.device != buffer.device or not tensor.is_contiguous():
        return None
    size = buffer.element_size()
    distance = tensor.data_ptr() - buffer.data_ptr()
    if distance % size or distance < 0 or distance // size + tensor.numel() > buffer.numel():
        return None
    return distance // size


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning("wenet_hooks: %s", message)


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
