"""Dropping pages of read-only file mappings once they have been read.

Tensors from ``torch.load(mmap=True)`` live in private, read-only file
mappings. Once a tensor has been copied or checksummed its pages are not
needed, but they keep counting as resident memory until the mapping goes:
reading a 6 GB checkpoint would keep 6 GB resident. ``madvise(MADV_DONTNEED)``
lets the kernel drop them; a page touched again is read back from the file.
"""

from __future__ import annotations

import ctypes
import os

import torch


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise, os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, ValueError):  # not Linux: resident pages stay until unmapped
        return None, 1


_MADVISE, _PAGE = _madvise()
_MADV_DONTNEED = 4


def release_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the whole pages under ``tensor``.

    ONLY for tensors of ``torch.load(mmap=True)`` mappings that nothing writes:
    on ordinary (anonymous) memory MADV_DONTNEED would zero the data.
    """
    if _MADVISE is None or not tensor.numel():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if hi > lo:
        _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
