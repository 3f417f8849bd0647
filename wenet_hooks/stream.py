"""Writing a state dict tensor by tensor, holding one tensor in memory at a time.

``torch.save`` needs the whole state dict in memory. Here the file is laid out
first from shapes and dtypes alone (``torch.serialization.skip_data`` over
fake tensors reserves each storage's bytes), then each tensor is produced,
written into its reserved place with ``pwrite`` and dropped. The result is an
ordinary ``torch.save`` file (tied keys share one storage), published by the
same tmp -> fsync -> verify -> rename path as ``write_state_dict``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from wenet_hooks.io import atomic_publish
from wenet_hooks.verify import Manifest, TensorSpec, tensor_checksum

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One key of the file: its shape and dtype, or the key whose tensor it shares."""

    key: str
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    alias_of: Optional[str] = None


def can_stream() -> bool:
    """torch >= 2.6 has ``serialization.skip_data``; older versions use torch.save."""
    return hasattr(torch.serialization, "skip_data")


def write_streamed(entries: list[Entry], tensors: Iterable[torch.Tensor], path: Path, *,
                   verify: bool = True, on_tensor: Optional[Callable[[torch.Tensor], None]] = None) -> Path:
    """Write ``entries`` to ``path``; ``tensors`` yields the non-alias entries' values in order.

    Raises:
        CheckpointWriteError, VerificationError: as ``write_state_dict``.
        ValueError: a produced tensor does not have its entry's shape or dtype.
    """
    started = time.perf_counter()

    def fill(tmp: Path) -> Manifest:
        return write_into(tmp, entries, tensors, on_tensor=on_tensor)

    atomic_publish(path, fill, verify=verify, nbytes_hint=sum(_nbytes(e) for e in entries))
    size = path.stat().st_size
    logger.info("wrote %s (%.1f MB, %.0f MB/s, streamed)", path, size / 1e6,
                size / 1e6 / max(time.perf_counter() - started, 1e-9))
    return path


def write_into(tmp: Path, entries: list[Entry], tensors: Iterable[torch.Tensor], *, checksums: bool = True,
               on_tensor: Optional[Callable[[torch.Tensor], None]] = None) -> Manifest:
    """Write and fsync ``tmp`` (no publishing); what it holds, with CRC32s if ``checksums``."""
    offsets = _lay_out(entries, tmp)
    specs = _fill(entries, tensors, tmp, offsets, on_tensor, checksums)
    return Manifest(specs, tuple((e.alias_of, e.key) for e in entries if e.alias_of))


def entries_for(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[Entry], list[torch.Tensor]]:
    """The entries of an in-memory state dict and the tensors to write, in order.

    Keys holding the same tensor (tied weights) become aliases, stored once as
    torch.save would; distinct views into one buffer (``consolidate`` may
    return those) are stored separately, each with only its own bytes.
    """
    entries, tensors, first = [], [], {}
    for key, tensor in state_dict.items():
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype)
        if tensor.numel() and view in first:
            entries.append(Entry(key, alias_of=first[view]))
            continue
        first.setdefault(view, key)
        entries.append(Entry(key, tuple(tensor.shape), tensor.dtype))
        tensors.append(tensor)
    return entries, tensors


def _nbytes(entry: Entry) -> int:
    if entry.alias_of:
        return 0
    numel = 1
    for d in entry.shape:
        numel *= d
    return numel * torch.empty((), dtype=entry.dtype).element_size()


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


def _fill(entries: list[Entry], tensors: Iterable[torch.Tensor], tmp: Path, offsets: list[int],
          on_tensor, checksums: bool) -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = {}
    produced: Iterator[torch.Tensor] = iter(tensors)
    fd = os.open(tmp, os.O_WRONLY)
    try:
        index = 0
        for e in entries:
            if e.alias_of:
                specs[e.key] = specs[e.alias_of]
                continue
            tensor = next(produced).contiguous()
            if tuple(tensor.shape) != tuple(e.shape) or tensor.dtype != e.dtype:
                raise ValueError(f"'{e.key}': produced {tensor.dtype}{list(tensor.shape)}, laid out as "
                                 f"{e.dtype}{list(e.shape)}")
            _pwrite_all(fd, tensor, offsets[index])
            specs[e.key] = TensorSpec(tuple(e.shape), e.dtype, tensor_checksum(tensor) if checksums else None)
            if on_tensor is not None:
                on_tensor(tensor)
            index += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return specs


def _pwrite_all(fd: int, tensor: torch.Tensor, offset: int) -> None:
    if not tensor.numel():
        return
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    while view:  # one pwrite moves at most about 2 GiB on Linux
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
