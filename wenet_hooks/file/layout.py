"""Putting a state dict's bytes into a file, one tensor at a time.

A file is described by :class:`Entry` s (key, shape, dtype, or the key whose
tensor it shares) before any value exists, so readers of existing checkpoints
can describe one from metadata alone and the values can be produced lazily.

``torch.save`` needs the whole state dict in memory. With torch >= 2.6 the file
is laid out first from shapes and dtypes alone (``torch.serialization.skip_data``
reserves each storage's bytes), then each tensor is produced, written into its
place with ``pwrite`` and dropped. The result is an ordinary ``torch.save`` file
(tied keys share one storage). Older torch writes with ``torch.save``.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from wenet_hooks.compat import can_stream
from wenet_hooks.file.manifest import Manifest, TensorIdentity, TensorSpec, tensor_identity

OnTensor = Callable[[torch.Tensor], None]


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
        return numel * torch.empty((), dtype=self.dtype).element_size()


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


def write_file(tmp: Path, entries: list[Entry], tensors: Iterable[torch.Tensor], *, checksums: bool,
               on_tensor: Optional[OnTensor] = None) -> Manifest:
    """Write and fsync ``tmp``; what it holds (with CRC32s if ``checksums``).

    ``tensors`` yields the values of the non-alias entries, in order.

    Raises:
        OSError: the file system refused (ENOSPC, EROFS, ...), whichever writer ran.
        ValueError: a produced tensor does not have its entry's shape or dtype.
    """
    if can_stream():
        offsets = _lay_out(entries, tmp)
        specs = _pwrite_each(entries, tensors, tmp, offsets, on_tensor, checksums)
    else:
        specs = _torch_save(entries, tensors, tmp, on_tensor, checksums)
    return Manifest(specs, tuple((e.alias_of, e.key) for e in entries if e.alias_of))


def _produced(entries: list[Entry], tensors: Iterable[torch.Tensor]) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Each non-alias entry with its value, checked against the entry."""
    values = iter(tensors)
    for e in entries:
        if e.alias_of:
            continue
        tensor = next(values).contiguous()
        if tuple(tensor.shape) != tuple(e.shape) or tensor.dtype != e.dtype:
            raise ValueError(f"'{e.key}': produced {tensor.dtype}{list(tensor.shape)}, laid out as "
                             f"{e.dtype}{list(e.shape)}")
        yield e, tensor


def _specs_of(entries: list[Entry], written: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    return {e.key: written[e.alias_of] if e.alias_of else written[e.key] for e in entries}


def _lay_out(entries: list[Entry], tmp: Path) -> list[int]:
    """Write the skeleton file; the byte offset of each non-alias entry's storage."""
    # Uninitialised tensors: the allocator maps their pages but nothing touches
    # them (skip_data does not read them), so they cost no resident memory.
    # (FakeTensorMode would do too, but importing it pulls in torch._dynamo: ~2 s.)
    skeleton: dict[str, torch.Tensor] = {}
    for e in entries:
        skeleton[e.key] = skeleton[e.alias_of] if e.alias_of else torch.empty(e.shape, dtype=e.dtype)
    with torch.serialization.skip_data(), open(tmp, "wb") as f:
        torch.save(skeleton, f)
    del skeleton
    # torch.save numbers storages in the order it first meets them: dict order.
    with open(tmp, "rb") as f:
        reader = torch._C.PyTorchFileReader(f)
        prefix = next(r for r in reader.get_all_records() if r.endswith("data.pkl"))[: -len("data.pkl")]
        count = sum(1 for e in entries if not e.alias_of)
        return [reader.get_record_offset(f"{prefix}data/{i}") for i in range(count)]


def _pwrite_each(entries: list[Entry], tensors: Iterable[torch.Tensor], tmp: Path, offsets: list[int],
                 on_tensor: Optional[OnTensor], checksums: bool) -> dict[str, TensorSpec]:
    written: dict[str, TensorSpec] = {}
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for offset, (e, tensor) in zip(offsets, _produced(entries, tensors)):
            # pwrite straight from the tensor: no copy through Python's buffered
            # writer, and the CRC taken while the bytes are hot in the cache.
            _pwrite_all(fd, tensor, offset)
            written[e.key] = TensorSpec.of(tensor, checksums)
            if on_tensor is not None:
                on_tensor(tensor)
        # Without fsync a power loss after the rename can publish a file of zeros.
        os.fsync(fd)
    finally:
        os.close(fd)
    return _specs_of(entries, written)


def _pwrite_all(fd: int, tensor: torch.Tensor, offset: int) -> None:
    if not tensor.numel():
        return
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    while view:  # one pwrite moves at most about 2 GiB on Linux
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _torch_save(entries: list[Entry], tensors: Iterable[torch.Tensor], tmp: Path,
                on_tensor: Optional[OnTensor], checksums: bool) -> dict[str, TensorSpec]:
    """torch < 2.6: the whole state dict in memory, then ``torch.save``."""
    state_dict: dict[str, torch.Tensor] = {}
    written: dict[str, TensorSpec] = {}
    for e, tensor in _produced(entries, tensors):
        state_dict[e.key] = tensor
        written[e.key] = TensorSpec.of(tensor, checksums)
        if on_tensor is not None:
            on_tensor(tensor)
    for e in entries:
        if e.alias_of:
            state_dict[e.key] = state_dict[e.alias_of]
    ordered = {e.key: state_dict[e.key] for e in entries}
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
    return _specs_of(entries, written)


def _raise_if_disk_full(error: RuntimeError, tmp: Path, needed: int) -> None:
    """torch < 2.6's writer reports a full disk as ``unexpected pos N vs M``: say what it is."""
    free = shutil.disk_usage(tmp.parent).free
    written = tmp.stat().st_size if tmp.exists() else 0
    if free < needed - written + (1 << 16):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from error
