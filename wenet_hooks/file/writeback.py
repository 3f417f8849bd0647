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
