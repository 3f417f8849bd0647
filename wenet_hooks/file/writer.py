"""Putting a state dict's bytes into a file, one tensor at a time, in any order.

A file is described by :class:`Entry` s (key, shape, dtype, or the key whose
tensor it shares) before any value exists, so readers of existing checkpoints
can describe one from metadata alone, the values can be produced lazily, and
a gather can hand each tensor over as it completes (:class:`FileWriter`).

``torch.save`` needs the whole state dict in memory. With torch >= 2.6 the file
is laid out first from shapes and dtypes alone (``torch.serialization.skip_data``
reserves each storage's bytes; :mod:`wenet_hooks.file.skeleton` keeps the
laid-out bytes for the next file of the same entries), then each tensor is
written into its place with ``pwrite`` and dropped. The result is an ordinary
``torch.save`` file (tied keys share one storage). Older torch writes with
``torch.save``.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from wenet_hooks.compat import can_stream
from wenet_hooks.file.crc import crc32, crc32_combine
from wenet_hooks.file.manifest import Manifest, TensorIdentity, TensorSpec, tensor_identity
from wenet_hooks.file.skeleton import lay_out, write_all, write_crcs
from wenet_hooks.file.writeback import Writeback


@dataclass(frozen=True)
class Pieces:
    """A tensor's value not copied together: its elements in C order are ``parts``, one after another.

    The readers of sharded checkpoints describe each parameter this way (1-D
    views into the ranks' memory-mapped partitions), and the writer ``pwrite`` s
    each part straight to its place in the file and continues the CRC-32 over
    it: a parameter is never assembled in memory, and no copy is made at all.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.parts) * self.dtype.itemsize

    def tensor(self) -> torch.Tensor:
        """The value as one new tensor (for a cast, or for torch < 2.6's ``torch.save``)."""
        if not self.parts:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.cat([p.reshape(-1) for p in self.parts]).view(self.shape)


# What a file's entry is written from: a tensor, or the pieces of one.
Value = Union[torch.Tensor, Pieces]
OnTensor = Callable[[Value], None]


@dataclass(frozen=True)
class Entry:
    """One key of the file: its shape and dtype, or the key whose tensor it shares."""

    key: str
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    alias_of: Optional[str] = None

    @property
    def nbytes(self) -> int:
        if self.alias_of:
            return 0
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


def entries_for(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[Entry], list[torch.Tensor]]:
    """The entries of an in-memory state dict and the tensors to write, in order.

    Keys holding the same tensor (tied weights) become aliases, stored once as
    ``torch.save`` would; distinct views into one buffer are stored separately,
    each with only its own bytes.
    """
    entries, tensors = [], []
    first: dict[TensorIdentity, str] = {}
    for key, tensor in state_dict.items():
        identity = tensor_identity(tensor)
        if tensor.numel() and identity in first:
            entries.append(Entry(key, alias_of=first[identity]))
            continue
        first.setdefault(identity, key)
        entries.append(Entry(key, tuple(tensor.shape), tensor.dtype))
        tensors.append(tensor)
    return entries, tensors


class InMemory:
    """The sink a gather fills when no file is written (:func:`wenet_hooks.consolidate`): the same
    protocol as a file's (:class:`~wenet_hooks.file.publish.PendingFile`), ``receive`` and
    ``receive_part``; each entry's tensor is made at its first part, in the entry's dtype."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.shapes = {e.key: (e.shape, e.dtype) for e in entries if not e.alias_of}
        self.values: dict[str, torch.Tensor] = {}

    def receive(self, key: str, value: Value) -> None:
        self.values[key] = value.tensor() if isinstance(value, Pieces) else value

    def receive_part(self, key: str, start: int, part: torch.Tensor) -> None:
        if key not in self.values:
            shape, dtype = self.shapes[key]
            self.values[key] = torch.empty(shape, dtype=dtype)
        self.values[key].view(-1).narrow(0, start, part.numel()).copy_(part.reshape(-1))

    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """Every entry's tensor, in order; an alias is its key's tensor itself (tied weights stay tied)."""
        return OrderedDict((e.key, self.values[e.alias_of or e.key]) for e in self.entries)


class FileWriter:
    """The one writer of the package: a file described by its entries, whose tensors arrive in any
    order, each written as it comes (``write``) and dropped by the caller; or in parts, in any
    order too (``write_part``: a gather's fragments, each written where it belongs as it arrives).

    With torch >= 2.6 the file is laid out first from shapes and dtypes alone
    (``torch.serialization.skip_data`` reserves each storage's bytes), then each
    tensor (or part) is ``pwrite`` n straight from memory to its offset, its CRC32
    taken while the bytes are hot (per run of consecutive bytes, combined once a
    tensor's parts cover it), and the disk's writing of it started as soon
    as 8 MiB are waiting (:class:`~wenet_hooks.file.writeback.Writeback`): memory holds the
    values in flight only, and the final fsync finds most of the file on disk.
    Older torch keeps them until :meth:`close`, which writes with ``torch.save``.
    The result is an ordinary ``torch.save`` file either way (tied keys share one storage).
    """

    def __init__(self, tmp: Path, entries: list[Entry], *, checksums: bool) -> None:
        self.tmp, self.entries, self.checksums = tmp, entries, checksums
        self.expected = {e.key: e for e in entries if not e.alias_of}
        self.written: dict[str, TensorSpec] = {}
        self.held: dict[str, torch.Tensor] = {}  # torch < 2.6: every tensor until close
        self.runs: dict[str, _Runs] = {}  # entries written part by part, not complete yet
        self.fd: Optional[int] = None
        if can_stream():
            skeleton = lay_out(entries, tmp)
            self.offsets = dict(zip(self.expected, skeleton.offsets))  # where each stored entry's bytes go
            self.crc_at = dict(zip(self.expected, skeleton.crc_at))
            self.crcs: dict[str, int] = {}
            self.fd = os.open(tmp, os.O_RDWR)
            self.writeback = Writeback(self.fd)

    def write(self, key: str, value: Value) -> None:
        """Write the value of ``key`` (a non-alias entry): a tensor, or its :class:`Pieces`.

        Raises:
            OSError: the file system refused.
            ValueError: ``key`` is not an entry, was written already, or ``value`` does not fit it.
        """
        e = self.expected.get(key)
        if e is None or key in self.written:
            raise ValueError(f"'{key}': {'written twice' if e is not None else 'not an entry of the file'}")
        _check_fits(key, value, e)
        if self.fd is not None:
            # pwrite straight from the tensor or its parts: no copy through Python's buffered writer.
            parts = value.parts if isinstance(value, Pieces) else (value.contiguous(),)
            start = offset = self.offsets[key]
            crc = 0
            for part in parts:
                raw = _raw(part)
                crc = crc32(raw, crc)
                write_all(self.fd, raw, offset)
                offset += len(raw)
            self.writeback.written(start, offset - start)
            self.crcs[key] = crc
            spec = TensorSpec(tuple(e.shape), e.dtype, crc)
        else:
            tensor = value.tensor() if isinstance(value, Pieces) else value.contiguous()
            self.held[key] = tensor
            spec = TensorSpec.of(tensor, checksum=True)
        self.written[key] = spec if self.checksums else TensorSpec(spec.shape, spec.dtype)

    def write_part(self, key: str, start: int, part: torch.Tensor) -> None:
        """Write ``part`` (contiguous, of the entry's dtype) as the elements of ``key`` from index
        ``start`` on (in C order); the entry is written once its parts cover it exactly.

        Raises:
            OSError: the file system refused.
            ValueError: ``key`` is not an entry or was written already, or the part does not fit it, or
                the parts overlap.
        """
        e = self.expected.get(key)
        if e is None:
            raise ValueError(f"'{key}': not an entry of the file")
        numel = math.prod(e.shape)
        if part.dtype != e.dtype or start < 0 or start + part.numel() > numel:
            raise ValueError(f"'{key}': a part of {part.dtype}[{part.numel()}] at element {start}; laid out as "
                             f"{e.dtype}{list(e.shape)} ({numel} values)")
        if not part.numel():  # nothing to place (and no run to start where another may begin), even once complete
            return
        if key in self.written:
            raise ValueError(f"'{key}': written twice")
        runs = self.runs.setdefault(key, _Runs(key))
        raw = _raw(part)
        if self.fd is not None:
            at = start * part.element_size()
            write_all(self.fd, raw, self.offsets[key] + at)
            self.writeback.written(self.offsets[key] + at, len(raw))
        else:
            if key not in self.held:  # torch < 2.6 keeps every tensor until close anyway
                self.held[key] = torch.empty(e.shape, dtype=e.dtype)
            self.held[key].view(-1)[start:start + part.numel()].copy_(part)
        runs.add(start * part.element_size(), raw)
        if runs.nbytes > e.nbytes:
            raise ValueError(f"'{key}': its parts overlap (more than its {e.nbytes} bytes written)")
        if runs.nbytes == e.nbytes:
            crc = runs.crc()
            del self.runs[key]
            if self.fd is not None:
                self.crcs[key] = crc
            spec = TensorSpec(tuple(e.shape), e.dtype, crc)
            self.written[key] = spec if self.checksums else TensorSpec(spec.shape, spec.dtype)

    def close(self) -> Manifest:
        """Everything written and fsynced: what the file holds.

        Raises:
            OSError: the file system refused.
            ValueError: an entry was never written.
        """
        missing = [key for key in self.expected if key not in self.written]
        if missing:
            raise ValueError(f"{len(missing)} entries were never written (first: '{missing[0]}')")
        if self.fd is not None:
            write_crcs(self.fd, [(self.crc_at[key], crc) for key, crc in self.crcs.items()])
            # Without fsync a power loss after the rename can publish a file of zeros.
            os.fsync(self.fd)
            self.abandon()
        else:
            _torch_save(self.entries, self.held, self.tmp)
            self.held = {}
        return Manifest(_specs_of(self.entries, self.written),
                        tuple((e.alias_of, e.key) for e in self.entries if e.alias_of))

    def abandon(self) -> None:
        """Close the file (idempotent); the caller removes it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.held = {}


class _Runs:
    """The parts of one entry written so far, as runs of consecutive bytes, each with its CRC-32:
    a part that continues a run continues its CRC; the runs' CRCs are combined once they cover the entry."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.ends: dict[int, int] = {}  # end byte of a run -> its start
        self.runs: dict[int, list[int]] = {}  # start byte -> [end byte, CRC-32 so far]
        self.nbytes = 0

    def add(self, at: int, raw: memoryview) -> None:
        """Raises ValueError: a run starts at ``at`` already."""
        self.nbytes += len(raw)
        start = self.ends.pop(at, None)
        if start is None:  # a new run
            if at in self.runs:
                raise ValueError(f"'{self.key}': its parts overlap (bytes from {at} written twice or more)")
            start = at
            self.runs[start] = [at, 0]
        run = self.runs[start]
        run[0], run[1] = at + len(raw), crc32(raw, run[1])
        self.ends[run[0]] = start

    def crc(self) -> int:
        """The entry's CRC-32 (its parts hold as many bytes as it does).

        Raises:
            ValueError: the parts overlap, so some bytes were never written.
        """
        crc, end = 0, 0
        for start in sorted(self.runs):
            if start != end:
                raise ValueError(f"'{self.key}': its parts overlap (bytes from {min(start, end)} written twice "
                                 "or more)")
            end, run_crc = self.runs[start]
            crc = crc32_combine(crc, run_crc, end - start)
        return crc


def _specs_of(entries: list[Entry], written: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    return {e.key: written[e.alias_of] if e.alias_of else written[e.key] for e in entries}


def _check_fits(key: str, value: Value, e: Entry) -> None:
    if tuple(value.shape) != tuple(e.shape) or value.dtype != e.dtype:
        raise ValueError(f"'{key}': produced {value.dtype}{list(value.shape)}, laid out as "
                         f"{e.dtype}{list(e.shape)}")
    if isinstance(value, Pieces):
        numel = sum(p.numel() for p in value.parts)
        bad = next((p for p in value.parts if p.dtype != e.dtype), None)
        if numel != math.prod(e.shape) or bad is not None:
            mixed = f", one of them {bad.dtype}" if bad is not None else ""
            raise ValueError(f"'{key}': its parts hold {numel} values{mixed}; laid out as "
                             f"{e.dtype}{list(e.shape)} ({math.prod(e.shape)} values)")


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bf16 included)."""
    if not tensor.numel():
        return memoryview(b"")
    if not tensor.is_contiguous():
        raise ValueError("a part of a value must be contiguous")
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def _torch_save(entries: list[Entry], held: dict[str, torch.Tensor], tmp: Path) -> None:
    """torch < 2.6: the whole state dict in memory, then ``torch.save``."""
    ordered = {}
    for e in entries:
        ordered[e.key] = ordered[e.alias_of] if e.alias_of else held[e.key]
    # A Python file object (not a path) makes most write failures surface as
    # OSError with errno (ENOSPC, EROFS), which the publisher turns into advice.
    with open(tmp, "wb") as f:
        try:
            torch.save(ordered, f)
        except RuntimeError as e:
            _raise_if_disk_full(e, tmp, sum(entry.nbytes for entry in entries))
            raise
        f.flush()
        os.fsync(f.fileno())


def _raise_if_disk_full(error: RuntimeError, tmp: Path, needed: int) -> None:
    """torch < 2.6's writer reports a full disk as ``unexpected pos N vs M``: say what it is."""
    free = shutil.disk_usage(tmp.parent).free
    written = tmp.stat().st_size if tmp.exists() else 0
    if free < needed - written + (1 << 16):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from error
