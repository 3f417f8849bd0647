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
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from wenet_hooks.dist import is_distributed
from wenet_hooks.errors import ConsolidationError, FirstError
from wenet_hooks.gather.agreement import AgreedLayout
from wenet_hooks.gather.masters import Fragment, Partitions
from wenet_hooks.gather.snapshots import SnapshotPool
from wenet_hooks.gather.staging import Staging

logger = logging.getLogger(__name__)

# Rank 0 receives this much per collective. Larger buckets were slower on
# gloo (its temporaries above glibc's 32 MB mmap threshold are page-faulted
# afresh each time); 16 MB messages already keep NCCL near full bandwidth.
DEFAULT_BUCKET_MB = 16.0
_FP32_BYTES = 4

ALLOCATING = "allocating memory for the gathered weights"
# Where rank 0 hands each fragment as it arrives: (its tensor's index in the gather, the element it starts at,
# its values on CPU in the target dtype).
OnFragment = Callable[[int, int, torch.Tensor], None]
# Where rank 0 hands each finished tensor under its file's key: a sink's receive (PendingFile, InMemory).
Write = Callable[[str, torch.Tensor], None]
# Where rank 0 hands each fragment under its file's key: a sink's receive_part.
WritePart = Callable[[str, int, torch.Tensor], None]


def prepare_gather(
    parts: Optional[Partitions],
    agreed: Optional[AgreedLayout],
    target: torch.dtype,
    bucket_bytes: int,
    failure: FirstError,
    state_key: Optional[str] = None,
    background_group: Any = None,
    staging: Optional[Staging] = None,
    pool: Optional[SnapshotPool] = None,
) -> PendingGather:
    """The gather of this rank's flat partitions ``parts`` (of the fp32 masters, or of optimizer state
    ``state_key``: flat tensors of the masters' own layout) in the layout every rank ``agreed`` on (the
    save's plan: :mod:`wenet_hooks.gather.agreement`), allocated here (the caller votes on every rank's
    allocations); :meth:`PendingGather.run` moves them to rank 0.

    Parameters (indices into the view's ``params``) not in the result's
    ``indices`` are not gathered here (frozen, or a layout this does not know:
    ``agreed`` is None); the caller gets them the per-parameter way. Local
    failures are recorded in ``failure`` and the collectives continue.

    With ``background_group`` (a gloo group of every rank), each rank copies its
    flat partitions to host memory: into ``staging``'s buffers when the staging
    runs (:mod:`wenet_hooks.gather.staging`), else now, into buffers lent by
    ``pool``; and ``run`` may be called later, off the training thread, while
    training changes the originals: its collectives go over that group, never
    interleaving with training's.
    """
    if not is_distributed() or bucket_bytes <= 0 or agreed is None:
        return PendingGather(set())
    gather = PendingGather(set(agreed.by_param))
    # Every rank described its partitions. An optimizer state's flats share the masters' layout, and
    # every rank holds the state (the save's plan agreed on its keys first: optimizer.agreed_state_keys).
    try:
        if parts is None:  # reported at the caller's vote, which every rank reaches
            raise ConsolidationError(f"optimizer state '{state_key}' is missing on rank {dist.get_rank()}")
        flats, group = parts.flats, parts.process_group
        if background_group is not None:
            if staging is not None:  # the staging gives its buffers back
                host_copy = staging.buffer_for
            else:  # lent by the engine's pool until sent
                assert pool is not None, "a background gather without a staging copies into the engine's pool"
                gather.pool = pool
                host_copy = pool.snapshot
            flats, group = [host_copy(flat) for flat in flats], background_group
        gather.allocate(flats, agreed, bucket_bytes, group, target, failure)
    except Exception as e:
        failure.record(ALLOCATING, e)
        gather.release()
    return gather


class PendingGather:
    """A gather every rank agreed on: the parameters it covers, and every rank's flat buffers still to
    send to rank 0, chunk by chunk, in one fixed sequence of collectives with buffers allocated once.

    gloo (host memory): ``gather``, so only rank 0 receives. Accelerator
    backends: ``all_gather_into_tensor`` over the partitions' own group, the
    collective DeepSpeed itself moves partitions with, on its data-parallel
    communicator: NCCL's ``gather`` is point-to-point underneath and would open
    a connection (with buffers kept for the communicator's life) from rank 0 to
    every peer. Every rank then receives each bucket: the extra accelerator
    memory is one bucket (``bucket_mb``) on every rank.
    """

    def __init__(self, indices: set[int]) -> None:
        self.indices = indices
        self.flats: list[torch.Tensor] = []
        self.agreed: Optional[AgreedLayout] = None  # None: nothing to move (no layout, or allocating failed here)
        self.pool: Optional[SnapshotPool] = None  # the engine's pool that lent ``flats`` (host copies), if it did
        self.receiver: Optional[_Receiver] = None  # rank 0
        self.out: Optional[torch.Tensor] = None  # the receive buffer: rank 0's (every rank's with all_gather)

    def allocate(self, flats: list[torch.Tensor], agreed: AgreedLayout, bucket_bytes: int, group: Any,
                 target: torch.dtype, failure: FirstError) -> None:
        """Every buffer the run needs, before its first collective: running out of memory here cannot
        strand the other ranks mid-loop."""
        self.group, self.failure = group, failure
        self.world = dist.get_world_size(group=group)
        # No chunk larger than the largest flat buffer: a small model's gather then holds kilobytes,
        # not a whole bucket, while it waits in the background.
        self.chunk = max(1, min(bucket_bytes // (_FP32_BYTES * self.world), max(agreed.flat_numels, default=1)))
        self.device = _comm_device(group)
        self.all_gather = use_all_gather(group)
        rank0 = dist.get_rank() == 0
        self.receiver = _Receiver(agreed, target, failure) if rank0 else None
        if self.all_gather or rank0:
            self.out = torch.empty(self.world * self.chunk, dtype=torch.float32, device=self.device)
            if self.receiver is not None and self.out.device.type == "cpu":
                self.receiver.hold(self.out.numel() * self.out.element_size())  # host memory it holds
        self.zeros = torch.zeros(self.chunk, dtype=torch.float32, device=self.device)  # sent for a failed part
        self.flats, self.agreed = flats, agreed

    def run(self, on_fragment: Optional[OnFragment] = None) -> int:
        """Collective over the group it was prepared with (the ranks have voted on their allocations):
        each fragment handed to ``on_fragment`` on rank 0 as it arrives, never assembled: rank 0's memory
        holds its receive buffer, one bucket, whatever the tensors' sizes. Run once.

        Returns:
            The most host memory rank 0's receiving held at once, its receive buffer included (0 elsewhere).
        """
        agreed, receiver = self.agreed, self.receiver
        if agreed is None or not self.indices:
            self.release()
            return 0
        if receiver is not None:
            receiver.on_fragment = on_fragment
        failed = False
        try:
            for group, flat in enumerate(self.flats):
                for lo in range(0, agreed.flat_numels[group], self.chunk):
                    numel = min(self.chunk, agreed.flat_numels[group] - lo)
                    send, failed = self._chunk_to_send(flat, lo, numel, failed)
                    received = self._exchange(send, numel)
                    if receiver is not None:
                        receiver.place(group, lo, received)
        finally:
            self.release()
        return receiver.peak_bytes if receiver is not None else 0

    def release(self) -> None:
        """Sent, or never to be: the host copies lent by the engine's pool are free for the next save's,
        and the buffers (and, through ``on_fragment``, whatever its closure holds) are freed now."""
        if self.pool is not None:
            self.pool.give_back(self.flats)
        self.flats, self.agreed, self.receiver, self.out, self.pool = [], None, None, None, None

    def _chunk_to_send(self, flat: torch.Tensor, lo: int, numel: int, failed: bool) -> tuple[torch.Tensor, bool]:
        """This rank's contribution, or zeros (allocated in advance) once anything here has failed."""
        if not failed:
            try:
                return _read_chunk(flat, lo, numel, self.device), False
            except Exception as e:
                self.failure.record(f"reading elements {lo}..{lo + numel} of the fp32 partition", e)
        return self.zeros[:numel], True

    def _exchange(self, send: torch.Tensor, numel: int) -> Optional[list[torch.Tensor]]:
        """Collective: rank 0 gets every rank's ``numel`` elements (in rank order); the others None."""
        out = self.out
        received = None if out is None else [out[r * numel:(r + 1) * numel] for r in range(self.world)]
        if self.all_gather:
            dist.all_gather_into_tensor(out[: self.world * numel], send, group=self.group)
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


def _read_chunk(flat: torch.Tensor, lo: int, numel: int, device: torch.device) -> torch.Tensor:
    return flat.detach().narrow(0, lo, numel).to(device).contiguous()


class _Receiver:
    """Rank 0: each received fragment handed over as it arrives (to a sink's ``receive_part``).

    Each fragment goes straight from the receive buffer to its place, cast
    first where the sink wants another dtype: rank 0 holds its receive buffer
    (one bucket) and at most one cast fragment, whatever the size of the model
    or of its largest tensor, and whatever the world size. :attr:`peak_bytes`
    counts the most host memory it held at once, its receive buffer included
    (on an accelerator the buffer is device memory, and each rank's chunk is
    copied to the host one at a time).

    (Receiving straight into views of one big host buffer was tried: gloo
    copies through a temporary of its own, so it saved nothing.)
    """

    def __init__(self, agreed: AgreedLayout, target: torch.dtype, failure: FirstError) -> None:
        self.failure = failure  # the gather's record: nothing more is placed once anything failed here
        self.target = target
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
        if self.failure or received is None:
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
            self.failure.record(f"copying gathered weights (partition {group}, offset {lo}) to host memory", e)

    def _place_rank(self, group: int, rank: int, lo: int, chunk: torch.Tensor) -> None:
        hi = lo + chunk.numel()
        queue, key = self.queues[(group, rank)], (group, rank)
        while self.cursors[key] < len(queue):
            f = queue[self.cursors[key]]
            if f.offset >= hi:
                return
            start, end = max(f.offset, lo), min(f.offset + f.numel, hi)
            if start < end:
                self._hand_over(f.param, f.start + (start - f.offset), chunk[start - lo:end - lo])
            if f.offset + f.numel > hi:
                return  # continues in the next chunk
            self.cursors[key] += 1

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` more held (a negative count: released)."""
        self.held_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def _hand_over(self, index: int, start: int, piece: torch.Tensor) -> None:
        if self.on_fragment is None:
            return
        if piece.dtype == self.target:  # a view of the receive buffer: written before the next exchange
            self.on_fragment(index, start, piece)
            return
        cast = piece.to(self.target)
        self.hold(cast.numel() * cast.element_size())
        try:
            self.on_fragment(index, start, cast)
        finally:
            self.hold(-cast.numel() * cast.element_size())
