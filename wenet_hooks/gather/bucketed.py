"""Move every rank's flat fp32 partitions to rank 0 in a few large collectives.

DeepSpeed's ``safe_get_full_fp32_param`` costs one collective per parameter
(an all-reduce of the whole parameter under ZeRO-1/2, which also turns -0.0
into +0.0). Here each rank sends contiguous chunks of its flat fp32 buffers
(:mod:`wenet_hooks.gather.masters`), ``bucket_bytes`` received by rank 0 per
collective, and rank 0 copies each fragment into place: the bytes DeepSpeed
holds, bit for bit, at the speed of the interconnect.

Every rank runs the same sequence of collectives whatever happens locally: a
rank whose part fails sends zeros and reports the failure afterwards, so no
rank is ever left alone in a collective.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from wenet_hooks.dist import all_ok, is_distributed
from wenet_hooks.gather.masters import (
    Fragment,
    Partitions,
    find_partitions_quietly,
    full_numel,
    full_shape,
    optimizer_state_partitions,
)

logger = logging.getLogger(__name__)

# Rank 0 receives this much per collective. Larger buckets were slower on
# gloo (its temporaries above glibc's 32 MB mmap threshold are page-faulted
# afresh each time); 16 MB messages already keep NCCL near full bandwidth.
DEFAULT_BUCKET_MB = 16.0
_FP32_BYTES = 4

# Where a rank records a local failure (what it was doing, the error) and goes on.
RecordFailure = Callable[[str, Exception], None]


@dataclass
class Gathered:
    """The parameters gathered from partitions: their indices (on every
    rank) and, on rank 0, their full values on CPU."""

    indices: set[int] = field(default_factory=set)
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)


def gather_partitions(
    engine: object,
    params: Sequence[torch.nn.Parameter],
    target: torch.dtype,
    bucket_bytes: int,
    record_failure: RecordFailure,
    state_key: Optional[str] = None,
) -> Gathered:
    """Collective: the fp32 masters of ``params`` that DeepSpeed partitions, on rank 0.

    With ``state_key``, that optimizer state of each parameter (``exp_avg``...)
    instead: it lies in flat tensors of the masters' own layout.

    Parameters whose index is not in the result's ``indices`` were not
    gathered here (frozen, or a layout this does not know); the caller gets
    them the per-parameter way. Local failures go to ``record_failure`` and the
    collectives continue.
    """
    if not is_distributed() or bucket_bytes <= 0:
        return Gathered()
    parts = _find_quietly(engine, params, state_key)
    layout = _agree_on_layout(parts, params)
    if layout is None:
        return Gathered()
    assert parts is not None  # every rank described its partitions
    chunk = max(1, bucket_bytes // (_FP32_BYTES * dist.get_world_size()))
    try:
        device = _comm_device(parts.process_group)
        # Rank 0's host tensors and receive buffer: allocated before the first
        # chunk, so running out of memory here cannot strand the others mid-loop.
        receiver = _Receiver(layout, params, target, chunk, device, record_failure) if dist.get_rank() == 0 else None
        zeros = torch.zeros(chunk, dtype=torch.float32, device=device)  # sent in place of a part that failed
        ready = True
    except Exception as e:
        record_failure("allocating memory for the gathered weights", e)
        ready = False
    if not all_ok(ready, "allocating memory for the gathered weights"):
        return Gathered(set(layout.by_param))
    failed = False
    for group, flat in enumerate(parts.flats):
        for lo in range(0, layout.flat_numels[group], chunk):
            numel = min(chunk, layout.flat_numels[group] - lo)
            send, failed = _chunk_to_send(flat, lo, numel, device, zeros, failed, record_failure)
            gathered = receiver.buffer(numel) if receiver else None
            dist.gather(send, gather_list=gathered, dst=0, group=parts.process_group)
            if receiver:
                receiver.place(group, lo, gathered)
    return Gathered(set(layout.by_param), receiver.tensors if receiver else {})


@dataclass
class _Layout:
    """What every rank agreed on: flat buffer sizes and who holds which fragment."""

    flat_numels: list[int]
    by_rank: list[list[Fragment]]
    by_param: dict[int, list[Fragment]]


def _find_quietly(engine: object, params: Sequence[torch.nn.Parameter],
                  state_key: Optional[str]) -> Optional[Partitions]:
    parts = find_partitions_quietly(engine, params)
    if parts is None or state_key is None:
        return parts
    return optimizer_state_partitions(engine, parts, state_key)


def _agree_on_layout(parts: Optional[Partitions], params: Sequence[torch.nn.Parameter]) -> Optional[_Layout]:
    """Collective: the layout if every rank's description is usable and complete, else None."""
    mine = None if parts is None else ([f.numel() for f in parts.flats], parts.fragments)
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    if any(r is None for r in reports):
        return None
    sizes = reports[0][0]
    if any(r[0] != sizes for r in reports):
        return _unusable("flat fp32 partitions differ in size between ranks")
    by_param: dict[int, list[Fragment]] = defaultdict(list)
    for _, fragments in reports:
        for f in fragments:
            by_param[f.param].append(f)
    for index, fragments in by_param.items():
        if not _covers(fragments, full_numel(params[index])):
            return _unusable(f"fragments of parameter {index} do not cover it exactly once")
    return _Layout(sizes, [r[1] for r in reports], dict(by_param))


def _covers(fragments: list[Fragment], numel: int) -> bool:
    end = 0
    for f in sorted(fragments, key=lambda f: f.start):
        if f.start != end:
            return False
        end += f.numel
    return end == numel


def _unusable(why: str) -> None:
    if dist.get_rank() == 0:
        logger.warning("wenet_hooks: gathering parameter by parameter: %s", why)
    return None


def _comm_device(group: object) -> torch.device:
    # gloo moves host tensors; NCCL and the other accelerator backends want
    # device tensors, even when the optimizer state is offloaded to the CPU.
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _chunk_to_send(
    flat: torch.Tensor, lo: int, numel: int, device: torch.device, zeros: torch.Tensor, failed: bool,
    record_failure: RecordFailure,
) -> tuple[torch.Tensor, bool]:
    """This rank's contribution, or zeros (allocated in advance) once anything here has failed."""
    if not failed:
        try:
            return _read_chunk(flat, lo, numel, device), False
        except Exception as e:
            record_failure(f"reading elements {lo}..{lo + numel} of the fp32 partition", e)
    return zeros[:numel], True


def _read_chunk(flat: torch.Tensor, lo: int, numel: int, device: torch.device) -> torch.Tensor:
    return flat.detach().narrow(0, lo, numel).to(device).contiguous()


class _Receiver:
    """Rank 0: a reused receive buffer, and the full tensors each fragment is copied into.

    (Receiving straight into views of one big host buffer was tried: gloo
    copies through a temporary of its own, so it saved nothing, and
    consolidate's tensors would then all share one storage.)
    """

    def __init__(self, layout: _Layout, params: Sequence[torch.nn.Parameter], target: torch.dtype,
                 chunk: int, device: torch.device, record_failure: RecordFailure) -> None:
        self.world = len(layout.by_rank)
        self.record_failure = record_failure
        self.failed = False
        self.tensors = {
            index: torch.empty(full_shape(params[index]), dtype=target)
            for index in layout.by_param
        }
        # Per group and rank, fragments in flat order with a cursor: each chunk
        # only looks at the fragments it overlaps.
        self.queues: dict[tuple[int, int], list[Fragment]] = defaultdict(list)
        for rank, fragments in enumerate(layout.by_rank):
            for f in sorted(fragments, key=lambda f: f.offset):
                self.queues[(f.group, rank)].append(f)
        self.cursors: dict[tuple[int, int], int] = defaultdict(int)
        self._buffer = torch.empty(self.world, chunk, dtype=torch.float32, device=device)

    def buffer(self, numel: int) -> list[torch.Tensor]:
        return [self._buffer[rank, :numel] for rank in range(self.world)]

    def place(self, group: int, lo: int, received: list[torch.Tensor]) -> None:
        if self.failed:
            return
        try:
            for rank, chunk in enumerate(received):
                self._place_rank(group, rank, lo, chunk.cpu())
        except Exception as e:
            self.failed = True
            self.record_failure(f"copying gathered weights (partition {group}, offset {lo}) to host memory", e)

    def _place_rank(self, group: int, rank: int, lo: int, chunk: torch.Tensor) -> None:
        hi = lo + chunk.numel()
        queue, key = self.queues[(group, rank)], (group, rank)
        while self.cursors[key] < len(queue):
            f = queue[self.cursors[key]]
            if f.offset >= hi:
                return
            start, end = max(f.offset, lo), min(f.offset + f.numel, hi)
            if start < end:
                into = f.start + (start - f.offset)
                self.tensors[f.param].view(-1).narrow(0, into, end - start).copy_(chunk[start - lo:end - lo])
            if f.offset + f.numel > hi:
                return  # continues in the next chunk
            self.cursors[key] += 1
