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

A gather is prepared (layout agreed, memory allocated: collectives on the
default group) and then run. Prepared for the background, each rank first
copies its partitions to host memory, and the run goes over a gloo group of
its own, off the training thread (the optimizer state at a model+optimizer
save, :mod:`wenet_hooks.save`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from wenet_hooks.dist import is_distributed
from wenet_hooks.errors import ConsolidationError
from wenet_hooks.gather.agreement import AgreedLayout, agree
from wenet_hooks.gather.engines import snapshot_pool
from wenet_hooks.gather.masters import EngineView, Fragment, full_numel, full_shape
from wenet_hooks.gather.staging import Staging

logger = logging.getLogger(__name__)

# Rank 0 receives this much per collective. Larger buckets were slower on
# gloo (its temporaries above glibc's 32 MB mmap threshold are page-faulted
# afresh each time); 16 MB messages already keep NCCL near full bandwidth.
DEFAULT_BUCKET_MB = 16.0
_FP32_BYTES = 4

ALLOCATING = "allocating memory for the gathered weights"
# Where a rank records a local failure (what it was doing, the error) and goes on.
RecordFailure = Callable[[str, Exception], None]


# Rank 0 hands each gathered tensor over as it completes: (its index in the gather, its full value on CPU).
OnComplete = Callable[[int, torch.Tensor], None]
# Or each fragment as it arrives: (its tensor's index in the gather, the element it starts at, its values on CPU).
OnFragment = Callable[[int, int, torch.Tensor], None]
# Where rank 0 hands each finished tensor under its file's key: a PendingFile's write.
Write = Callable[[str, torch.Tensor], None]
# Where rank 0 hands each fragment under its file's key: a PendingFile's write_part.
WritePart = Callable[[str, int, torch.Tensor], None]


@dataclass
class Gathered:
    """The parameters gathered from partitions: their indices (on every rank) and, on rank 0, their
    full values on CPU (those not handed over as they completed or arrived), and the most rank 0's
    gather held at once (its receive buffer included)."""

    indices: set[int] = field(default_factory=set)
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    peak_bytes: int = 0


def prepare_gather(
    view: EngineView,
    target: torch.dtype,
    bucket_bytes: int,
    record_failure: RecordFailure,
    state_key: Optional[str] = None,
    background_group: Any = None,
    staging: Optional[Staging] = None,
) -> PendingGather:
    """The gather of the fp32 masters that DeepSpeed partitions, agreed on by every rank (a collective
    unless this save's plan agreed already) and allocated here (the caller votes on every rank's
    allocations); :meth:`PendingGather.run` moves them to rank 0.

    With ``state_key``, that optimizer state of each parameter (``exp_avg``...)
    instead: it lies in flat tensors of the masters' own layout.

    Parameters (indices into ``view.params``) not in the result's ``indices``
    are not gathered here (frozen, or a layout this does not know); the caller
    gets them the per-parameter way. Local failures go to ``record_failure``
    and the collectives continue.

    With ``background_group`` (a gloo group of every rank), each rank copies its
    flat partitions to host memory now (with ``staging``, when the staging
    runs: :mod:`wenet_hooks.gather.staging`), and ``run`` may be called later,
    off the training thread, while training changes the originals: its
    collectives go over that group, never interleaving with training's.
    """
    if not is_distributed() or bucket_bytes <= 0:
        return PendingGather(set())
    agreed = agree(view)
    if agreed is None:
        return PendingGather(set())
    # Every rank described its partitions. An optimizer state's flats share the masters' layout, and
    # every rank holds the state (the save's plan agreed on its keys first: optimizer.agreed_state_keys).
    parts = view.partitions if state_key is None else view.state_partitions(state_key)
    # No chunk larger than the largest flat buffer: a small model's gather then holds kilobytes,
    # not a whole bucket, while it waits in the background.
    chunk = max(1, min(bucket_bytes // (_FP32_BYTES * dist.get_world_size()), max(agreed.flat_numels, default=1)))
    moves = None
    try:
        if parts is None:  # reported after the vote that starts the run, which every rank reaches
            raise ConsolidationError(f"optimizer state '{state_key}' is missing on rank {dist.get_rank()}")
        flats, group = parts.flats, parts.process_group
        lent = background_group is not None and staging is None  # else the staging gives its buffers back
        if background_group is not None:
            host_copy = staging.buffer_for if staging is not None else snapshot_pool(view.engine).snapshot
            flats, group = [host_copy(flat) for flat in flats], background_group
        moves = _Moves(flats, agreed, chunk, group, _Collective.for_group(group, agreed, view.params, target, chunk,
                                                                          record_failure),
                       record_failure, snapshot=view.engine if lent else None)
    except Exception as e:
        record_failure(ALLOCATING, e)
    # The ranks vote on the allocations before any gather runs: a save prepares all its gathers and votes
    # once (wenet_hooks.save); consolidate votes on its own.
    return PendingGather(set(agreed.by_param), moves)


@dataclass
class PendingGather:
    """A gather every rank has agreed on: the parameters it covers, and the bytes still to move."""

    indices: set[int]
    moves: Optional[_Moves] = None  # None: nothing to move here (no layout, or allocating failed on this rank)

    def run(self, on_complete: Optional[OnComplete] = None, on_fragment: Optional[OnFragment] = None) -> Gathered:
        """Collective over the group it was prepared with: the full tensors, on rank 0; with
        ``on_complete``, each handed over there as it completes instead (rank 0's memory then holds
        the tensors in flight); with ``on_fragment``, each fragment as it arrives, never assembled
        (rank 0's memory then holds its receive buffer, one bucket, whatever the tensors' sizes).

        The ranks have voted on their allocations (every rank holds its moves) before any runs."""
        # Run once, then let go: the receive buffers (and, through on_complete, whatever its closure
        # holds) are freed now, not whenever a reference cycle through a caller is collected.
        moves, self.moves = self.moves, None
        if moves is None or not self.indices:
            if moves is not None:
                moves.release()
            return Gathered(self.indices)
        receiver = moves.collective.receiver
        if receiver is not None:
            receiver.on_complete, receiver.on_fragment = on_complete, on_fragment
        try:
            tensors = moves.run()
        finally:
            if receiver is not None:
                receiver.on_complete = receiver.on_fragment = None
        return Gathered(self.indices, tensors, receiver.peak_bytes if receiver is not None else 0)


@dataclass
class _Moves:
    """Every rank's flat buffers, sent to rank 0 chunk by chunk in one fixed sequence of collectives."""

    flats: list[torch.Tensor]
    agreed: AgreedLayout
    chunk: int
    group: Any
    collective: _Collective
    record_failure: RecordFailure
    snapshot: Any = None  # the engine whose pool lent the flats (host copies), or None: DeepSpeed's own

    def run(self) -> dict[int, torch.Tensor]:
        failed = False
        receiver = self.collective.receiver
        for group, flat in enumerate(self.flats):
            for lo in range(0, self.agreed.flat_numels[group], self.chunk):
                numel = min(self.chunk, self.agreed.flat_numels[group] - lo)
                send, failed = _chunk_to_send(flat, lo, numel, self.collective, failed, self.record_failure)
                received = self.collective.exchange(send, numel)
                if receiver is not None:
                    receiver.place(group, lo, received)
        self.release()
        return receiver.tensors if receiver is not None else {}

    def release(self) -> None:
        """Sent, or never to be: the host copies lent by the engine's pool are free for the next save's."""
        if self.snapshot is not None:
            snapshot_pool(self.snapshot).give_back(self.flats)
        self.flats = []


class _Collective:
    """One chunk from every rank to rank 0, with buffers allocated once.

    gloo (host memory): ``gather``, so only rank 0 receives. Accelerator
    backends: ``all_gather_into_tensor`` over the partitions' own group, the
    collective DeepSpeed itself moves partitions with, on its data-parallel
    communicator: NCCL's ``gather`` is point-to-point underneath and would open
    a connection (with buffers kept for the communicator's life) from rank 0 to
    every peer. Every rank then receives each bucket: the extra accelerator
    memory is one bucket (``bucket_mb``) on every rank.
    """

    def __init__(self, group: Any, chunk: int, device: torch.device, all_gather: bool,
                 receiver: Optional[_Receiver]) -> None:
        self.group, self.device, self.all_gather, self.receiver = group, device, all_gather, receiver
        self.world = dist.get_world_size(group=group)
        receives = all_gather or dist.get_rank() == 0
        self.out = torch.empty(self.world * chunk, dtype=torch.float32, device=device) if receives else None
        self.zeros = torch.zeros(chunk, dtype=torch.float32, device=device)  # sent in place of a part that failed

    @classmethod
    def for_group(cls, group: Any, agreed: AgreedLayout, params: Sequence[torch.nn.Parameter], target: torch.dtype,
                  chunk: int, record_failure: RecordFailure) -> _Collective:
        device = _comm_device(group)
        # Rank 0's host tensors and receive buffer: allocated before the first chunk, so running
        # out of memory here cannot strand the others mid-loop.
        receiver = _Receiver(agreed, params, target, record_failure) if dist.get_rank() == 0 else None
        collective = cls(group, chunk, device, use_all_gather(group), receiver)
        if receiver is not None and collective.out is not None and collective.out.device.type == "cpu":
            receiver.hold(collective.out.numel() * collective.out.element_size())  # host memory it holds
        return collective

    def exchange(self, send: torch.Tensor, numel: int) -> Optional[list[torch.Tensor]]:
        """Collective: rank 0 gets every rank's ``numel`` elements (in rank order); the others None."""
        received = None if self.out is None else [self.out[r * numel:(r + 1) * numel] for r in range(self.world)]
        if self.all_gather:
            dist.all_gather_into_tensor(self.out[: self.world * numel], send, group=self.group)
        else:
            dist.gather(send, gather_list=received, dst=0, group=self.group)
        return received if dist.get_rank() == 0 else None


def use_all_gather(group: Any) -> bool:
    """Whether chunks move with ``all_gather_into_tensor`` (accelerator backends) rather than ``gather`` (gloo)."""
    return dist.get_backend(group) != "gloo"


def _comm_device(group: object) -> torch.device:
    # gloo moves host tensors; NCCL and the other accelerator backends want
    # device tensors, even when the optimizer state is offloaded to the CPU.
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _chunk_to_send(flat: torch.Tensor, lo: int, numel: int, collective: _Collective, failed: bool,
                   record_failure: RecordFailure) -> tuple[torch.Tensor, bool]:
    """This rank's contribution, or zeros (allocated in advance) once anything here has failed."""
    if not failed:
        try:
            return _read_chunk(flat, lo, numel, collective.device), False
        except Exception as e:
            record_failure(f"reading elements {lo}..{lo + numel} of the fp32 partition", e)
    return collective.zeros[:numel], True


def _read_chunk(flat: torch.Tensor, lo: int, numel: int, device: torch.device) -> torch.Tensor:
    return flat.detach().narrow(0, lo, numel).to(device).contiguous()


class _Receiver:
    """Rank 0: each received fragment handed over as it arrives, or copied into its full tensor.

    With ``on_fragment`` (a file writer's ``write_part``), each fragment goes
    straight from the receive buffer to its place, cast first where the file
    wants another dtype: rank 0 holds its receive buffer (one bucket) and at
    most one cast fragment, whatever the size of the model or of its largest
    tensor, and whatever the world size.
    Else a tensor is allocated at its first fragment and, with ``on_complete``,
    handed over and dropped at its last: rank 0 then holds the parameters in
    flight; one that straddles two ranks' partitions (ZeRO-1/2: at most one
    per rank boundary and group) waits until the later rank's chunk arrives.
    :attr:`peak_bytes` counts the most host memory it held at once, its receive
    buffer included (on an accelerator the buffer is device memory, and each
    rank's chunk is copied to the host one at a time).

    (Receiving straight into views of one big host buffer was tried: gloo
    copies through a temporary of its own, so it saved nothing, and
    consolidate's tensors would then all share one storage.)
    """

    def __init__(self, agreed: AgreedLayout, params: Sequence[torch.nn.Parameter], target: torch.dtype,
                 record_failure: RecordFailure) -> None:
        self.record_failure = record_failure
        self.failed = False
        self.target = target
        self.shapes = {index: full_shape(params[index]) for index in agreed.by_param}
        self.remaining = {index: full_numel(params[index]) for index in agreed.by_param}
        self.tensors: dict[int, torch.Tensor] = {}  # in flight; without on_complete, every one
        self.on_complete: Optional[OnComplete] = None
        self.on_fragment: Optional[OnFragment] = None
        self.held_bytes = self.peak_bytes = 0
        # Per group and rank, fragments in flat order with a cursor: each chunk
        # only looks at the fragments it overlaps.
        self.queues: dict[tuple[int, int], list[Fragment]] = defaultdict(list)
        for rank, fragments in enumerate(agreed.by_rank):
            for f in sorted(fragments, key=lambda f: f.offset):
                self.queues[(f.group, rank)].append(f)
        self.cursors: dict[tuple[int, int], int] = defaultdict(int)

    def place(self, group: int, lo: int, received: Optional[list[torch.Tensor]]) -> None:
        if self.failed or received is None:
            return
        try:
            for rank, chunk in enumerate(received):
                # On an accelerator (NCCL) each rank's chunk comes to host memory one at a time.
                host = chunk.cpu()
                copied = host.numel() * host.element_size() if host is not chunk else 0
                self.hold(copied)
                try:
                    self._place_rank(group, rank, lo, host)
                finally:
                    self.hold(-copied)
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
                if self.on_fragment is not None:
                    self._hand_over(f.param, into, chunk[start - lo:end - lo])
                else:
                    self._tensor(f.param).view(-1).narrow(0, into, end - start).copy_(chunk[start - lo:end - lo])
                self._count(f.param, end - start)
            if f.offset + f.numel > hi:
                return  # continues in the next chunk
            self.cursors[key] += 1

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` more held (a negative count: released)."""
        self.held_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def _hand_over(self, index: int, start: int, piece: torch.Tensor) -> None:
        assert self.on_fragment is not None
        if piece.dtype == self.target:  # a view of the receive buffer: written before the next exchange
            self.on_fragment(index, start, piece)
            return
        cast = piece.to(self.target)
        self.hold(cast.numel() * cast.element_size())
        try:
            self.on_fragment(index, start, cast)
        finally:
            self.hold(-cast.numel() * cast.element_size())

    def _tensor(self, index: int) -> torch.Tensor:
        if index not in self.tensors:
            tensor = torch.empty(self.shapes[index], dtype=self.target)
            self.tensors[index] = tensor
            self.hold(tensor.numel() * tensor.element_size())
        return self.tensors[index]

    def _count(self, index: int, numel: int) -> None:
        self.remaining[index] -= numel
        if self.remaining[index] == 0 and self.on_complete is not None:
            tensor = self.tensors.pop(index)
            self.hold(-tensor.numel() * tensor.element_size())
            self.on_complete(index, tensor)
