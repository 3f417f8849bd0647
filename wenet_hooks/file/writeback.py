"""Starting the disk's writes while the file is still being written.

A written page sits in the page cache until something flushes it; the kernel
starts on its own only once dirty pages pass ``dirty_background_ratio`` of
memory (gigabytes), so a 1 GB file written in one go is flushed entirely by
the final ``fsync``, after the last byte: writing, then flushing, one after
the other. Asking the kernel to start writing each range as soon as it is in
the page cache (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous: it
waits for nothing) lets the disk work while the next tensors are produced and
copied, and leaves the final ``fsync`` (which is still what makes the file
durable) little to do. Where the call does not exist (not Linux) nothing is
started early.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable, Optional

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_CALL = _sync_file_range() if os.name == "posix" else None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` of ``fd`` at ``offset`` to disk, without waiting.

    Best effort: a refusal (a file system without it) is ignored, since the
    final fsync writes everything anyway and reports any real error.
    """
    if _CALL is not None and nbytes > 0:
        _CALL(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


# Ranges are handed over once this many bytes are waiting, so that the disk gets
# large writes even from a file of many small tensors.
BATCH_BYTES = 8 << 20
# Between two records of a torch.save file lie a zip header and alignment
# (about a hundred bytes, written with the layout): a range that starts this
# close after the waiting one continues it.
_GAP = 4096


class Writeback:
    """The ranges of one file written so far, handed to :func:`start_writeback` in batches.

    Consecutive ranges (values written in file order, as readers and gathers
    mostly produce them, with only a record's header between them) are merged;
    a range that does not continue the waiting one hands that one over first.
    What is still waiting at the end is left to the final fsync.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lo = self.hi = 0

    def written(self, offset: int, nbytes: int) -> None:
        if self.hi == self.lo or not 0 <= offset - self.hi <= _GAP:  # nothing waits, or this does not continue it
            self.flush()
            self.lo = offset
        self.hi = offset + nbytes
        if self.hi - self.lo >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.hi > self.lo:
            start_writeback(self.fd, self.lo, self.hi - self.lo)
        self.lo = self.hi
