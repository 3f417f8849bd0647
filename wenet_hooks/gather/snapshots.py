"""Host buffers for the copies of each rank's flat partitions that a background gather sends.

A background gather cannot send DeepSpeed's own buffers: training changes
them at the next step. So each rank copies its partitions (the fp32 masters,
and each optimizer state) before that step (:mod:`wenet_hooks.gather.staging`)
into host buffers that it keeps from one save to the next, and the gather
sends those.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch


class SnapshotPool:
    """Host buffers for the copies a background gather sends, kept from one save to the next.

    A fresh buffer costs its page faults at every save, about four times the
    copy itself (1 GB: 0.5 s against 0.13 s here); kept, each rank holds its
    share of the masters and the optimizer state once more in host memory
    while the engine lives (its pool is emptied when the engine is collected:
    :class:`wenet_hooks.gather.masters.EngineState`).
    Pinned when the partition lies on an accelerator, so the copy runs at full
    speed: torch's caching host allocator rounds each pinned block up to a
    power of two, so the pool asks for exactly that and counts what it really
    holds (:attr:`nbytes`). A buffer still being sent (a save made before the
    previous one settled) is not in the pool, so the copy gets a new one.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()  # given back by the background thread
        self.nbytes = 0  # host memory the pool's buffers hold, lent or free

    def snapshot(self, flat: torch.Tensor) -> torch.Tensor:
        """A host copy of ``flat`` (a flat partition), taken now."""
        return self.take(flat).copy_(flat.detach().reshape(-1))

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """A host buffer of ``flat``'s size and dtype (its contents undefined), lent until :meth:`give_back`."""
        with self._lock:
            free = self._free[(flat.numel(), flat.dtype)]
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = self._allocate(flat.numel(), flat.dtype, pinned=flat.device.type != "cpu")
        return buffer

    def _allocate(self, numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        size = 1 << max(0, numel - 1).bit_length() if pinned else numel
        block = torch.empty(size, dtype=dtype, pin_memory=pinned)
        with self._lock:
            self.nbytes += block.numel() * block.element_size()
        return block[:numel]

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for buffer in buffers:
                self._free[(buffer.numel(), buffer.dtype)].append(buffer)

    def clear(self) -> None:
        """Drop every free buffer (lent ones go when their gather ends)."""
        with self._lock:
            self._free.clear()
            self.nbytes = 0
