"""A ``torch.save`` file laid out from shapes and dtypes alone, kept to be written again.

The streamed writer (:class:`~wenet_hooks.file.writer.FileWriter`) first lays
its file out: ``torch.save`` of uninitialised tensors under
``torch.serialization.skip_data``, which writes the zip records' headers, the
pickle and the central directory and leaves each storage's bytes a hole, to be
``pwrite`` n later. Laying out runs torch's pickler in Python: in a
background save it was half of the background thread's calls into C once the
verification left for a helper process, each taking the GIL back from the
training thread (bench/README.md, table 10). Every save of one model lays out
the same bytes, so a :class:`Skeleton` keeps them (all but the holes, a few
hundred bytes per tensor) with where each record's data and CRC-32 go, and
the next file of the same entries is made from it: a hole of the file's size
and a few ``pwrite`` s, bit for bit what ``torch.save`` would lay out.
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence

import torch

_DATA_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL_ENTRY = b"PK\x01\x02"
# Skeletons kept, the most recently used: the weights' and the optimizer's file of a model, and room for a
# second model or dtype. Each holds a few hundred bytes per tensor.
_KEEP = 4


class Described(Protocol):
    """One key of the file (:class:`~wenet_hooks.file.writer.Entry`): its shape and dtype, or the key it shares."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    alias_of: Optional[str]


@dataclass(frozen=True)
class Skeleton:
    """A laid-out file: its size, every byte outside the records' data, and where each stored (non-alias)
    entry's data and CRC-32 go, in entry order."""

    size: int
    sections: tuple[tuple[int, bytes], ...]  # (offset, bytes) of everything but the records' data
    offsets: tuple[int, ...]  # of each stored entry's data
    crc_at: tuple[tuple[int, ...], ...]  # each one's central directory CRC field and data descriptor's (none: empty)

    def write(self, path: Path) -> None:
        """Make ``path`` this file, its records' data holes to be filled."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(fd, self.size)
            for at, data in self.sections:
                write_all(fd, memoryview(data), at)
        finally:
            os.close(fd)


_KEPT: "OrderedDict[tuple, Skeleton]" = OrderedDict()
_LOCK = threading.Lock()  # files are laid out on the training thread and in the background


def lay_out(entries: Sequence[Described], path: Path) -> Skeleton:
    """Write the skeleton of the file of ``entries`` to ``path``; made from a kept one where the same
    entries were laid out before in this process."""
    key = tuple((e.key, tuple(e.shape), e.dtype, e.alias_of) for e in entries)
    with _LOCK:
        skeleton = _KEPT.get(key)
        if skeleton is not None:
            _KEPT.move_to_end(key)
    if skeleton is not None:
        skeleton.write(path)
        return skeleton
    skeleton = _laid_out_by_torch(entries, path)
    with _LOCK:
        _KEPT[key] = skeleton
        while len(_KEPT) > _KEEP:
            _KEPT.popitem(last=False)
    return skeleton


def write_crcs(fd: int, crcs: Iterable[tuple[tuple[int, ...], int]]) -> None:
    """Give each record the CRC-32 of the bytes written into it.

    torch.save's zip records carry their CRC-32 in a data descriptor after the
    data and in the central directory; ``skip_data`` left them describing no
    data. torch.load does not read them, but any zip tool does: written here,
    the file is torch.save's, bit for bit.

    Args:
        crcs: (where a record's CRC-32 goes: its :attr:`Skeleton.crc_at`, the CRC-32), for each record written.
    """
    for places, crc in crcs:
        packed = struct.pack("<I", crc)
        for at in places:
            os.pwrite(fd, packed, at)


def write_all(fd: int, view: memoryview, offset: int) -> None:
    """``pwrite`` all of ``view`` at ``offset``."""
    while len(view):  # one pwrite moves at most about 2 GiB on Linux
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _laid_out_by_torch(entries: Sequence[Described], path: Path) -> Skeleton:
    # Uninitialised tensors: the allocator maps their pages but nothing touches
    # them (skip_data does not read them), so they cost no resident memory.
    # (FakeTensorMode would do too, but importing it pulls in torch._dynamo: ~2 s.)
    skeleton: dict[str, torch.Tensor] = {}
    for e in entries:
        skeleton[e.key] = skeleton[e.alias_of] if e.alias_of else torch.empty(e.shape, dtype=e.dtype)
    with torch.serialization.skip_data(), open(path, "wb") as f:
        torch.save(skeleton, f)
    del skeleton
    # torch.save numbers storages in the order it first meets them: dict order. torch's reader names
    # records inside the archive's top folder ("data/0" for "archive/data/0").
    with open(path, "rb") as f:
        reader = torch._C.PyTorchFileReader(f)
        prefix = next(r for r in reader.get_all_records() if r.endswith("data.pkl"))[: -len("data.pkl")]
        names = [f"{prefix}data/{i}" for i in range(sum(1 for e in entries if not e.alias_of))]
        offsets = [reader.get_record_offset(name) for name in names]
    with zipfile.ZipFile(path) as archive:
        sizes = {info.filename.split("/", 1)[-1]: info.file_size for info in archive.infolist()}
        directory_at = archive.start_dir
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        central = _central_entries(os.pread(fd, size - directory_at, directory_at), directory_at)
        crc_at, data = [], []
        for name, offset in zip(names, offsets):
            nbytes = sizes[name]  # an empty record's CRC-32 is 0 already (and torch reports no offset of its own)
            end = offset + nbytes
            descriptor = end + 4 if nbytes and os.pread(fd, 4, end) == _DATA_DESCRIPTOR else end
            crc_at.append((central[name] + 16, descriptor) if nbytes else ())
            if nbytes:
                data.append((offset, end))
        sections, at = [], 0
        for lo, hi in sorted(data):
            if lo > at:
                sections.append((at, os.pread(fd, lo - at, at)))
            at = hi
        if size > at:
            sections.append((at, os.pread(fd, size - at, at)))
    return Skeleton(size, tuple(sections), tuple(offsets), tuple(crc_at))


def _central_entries(directory: bytes, directory_at: int) -> dict[str, int]:
    """Each record's name (inside the top folder) -> the offset of its central directory entry."""
    entry_of, pos = {}, 0
    while directory[pos:pos + 4] == _CENTRAL_ENTRY:  # each entry: 46 bytes, then name, extra, comment
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", directory, pos + 28)
        entry_of[directory[pos + 46:pos + 46 + name_len].decode("utf-8").split("/", 1)[-1]] = directory_at + pos
        pos += 46 + name_len + extra_len + comment_len
    return entry_of
