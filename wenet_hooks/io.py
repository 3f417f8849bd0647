"""The atomic single-file writer.

A checkpoint appears at its final path only once it is complete, on disk and
(optionally) verified: it is written to ``<name>.tmp`` in the same folder,
flushed, fsynced, checked, then renamed over the final path with
``os.replace``, which is atomic within one file system.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from wenet_hooks.errors import CheckpointWriteError, VerificationError
from wenet_hooks.verify import Manifest, verify

logger = logging.getLogger(__name__)

# Suffix of the file being written. A leftover one (a crash mid-write) is
# recognised by this suffix and removed by the next write of the same path.
TMP_SUFFIX = ".tmp"


def tmp_path_for(path: Union[str, Path]) -> Path:
    """Where ``path`` is written before it is published."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def write_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: Union[str, Path],
    *,
    expected: Optional[Manifest] = None,
    verify: bool = False,
) -> Path:
    """Write ``state_dict`` as ONE regular file at ``path``, atomically.

    The file loads with ``torch.load(path, map_location="cpu", mmap=True,
    weights_only=True)``; tensors that share a storage (tied weights) are
    stored once. If ``expected`` is given, the written bytes are reopened and
    verified against it before the file is published; ``verify=True`` does
    the same against ``state_dict`` itself, checksummed as it is written.
    On any failure nothing exists at ``path`` that was not there before, and
    no temporary file is left.

    Args:
        state_dict: a flat ``dict[str, Tensor]`` on CPU.
        path: the final file, e.g. ``exp/whisper/epoch_3.pt``.
        expected: what the file must hold (e.g. the model's keys and shapes).
        verify: check the file against ``state_dict`` when no ``expected`` is given.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CheckpointWriteError: the folder is missing or unwritable, the disk is
            full, or ``path`` is a folder.
        VerificationError: the written file does not match ``expected``.
    """
    path = Path(path)

    checksums = verify and expected is None

    def fill(tmp: Path) -> Optional[Manifest]:
        written = _write_and_sync(state_dict, tmp, checksums)
        return expected if expected is not None else written

    started = time.perf_counter()
    atomic_publish(path, fill, verify=expected is not None or verify, nbytes_hint=state_dict_nbytes(state_dict))
    nbytes = path.stat().st_size
    seconds = time.perf_counter() - started
    logger.info("wrote %s (%.1f MB, %.0f MB/s)", path, nbytes / 1e6, nbytes / 1e6 / max(seconds, 1e-9))
    return path


def atomic_publish(path: Path, fill: Callable[[Path], Optional[Manifest]], *, verify: bool,
                   nbytes_hint: int) -> None:
    """The one publishing path: ``fill(tmp)`` writes and fsyncs ``<path>.tmp`` and returns
    what it must hold; it is verified (if asked), renamed over ``path``, and the folder fsynced.
    On failure the temporary file is removed and an ``OSError`` becomes a ``CheckpointWriteError``.
    """
    _check_target(path)
    tmp = tmp_path_for(path)
    try:
        expected = fill(tmp)
        if verify and expected is not None:
            _verify_as(tmp, expected, path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError):
            raise CheckpointWriteError(path, _describe_os_error(e, path, nbytes_hint)) from e
        raise


def _remove_quietly(tmp: Path) -> None:
    # Cleaning up must not hide the error being reported (on a read-only file
    # system even unlinking a missing file fails).
    try:
        if tmp.exists():
            tmp.unlink()
    except OSError as e:
        logger.warning("could not remove %s: %s", tmp, e)


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise CheckpointWriteError(
            path,
            "a folder of that name exists (DeepSpeed >= 0.15.3's zero_to_fp32 output?); "
            "HINT: convert it with `wenet-hooks-convert model_dir=<folder> tag=<tag>`, "
            "which replaces it by a single file, or move it away",
        )
    if not path.parent.is_dir():
        raise CheckpointWriteError(path, f"the folder {path.parent} does not exist")


def _write_and_sync(state_dict: Mapping[str, torch.Tensor], tmp: Path, checksums: bool) -> Manifest:
    """Write and fsync ``tmp``; what it holds (with CRC32s if ``checksums``)."""
    from wenet_hooks.stream import can_stream, entries_for, write_into  # stream builds on this module

    if can_stream():
        # pwrite straight from each tensor: no copy through Python's buffered
        # writer (about 0.5 of the disk's speed at 1 GB with torch.save), and
        # each tensor checksummed while it is hot in the cache.
        entries, tensors = entries_for(state_dict)
        return write_into(tmp, entries, tensors, checksums=checksums)
    written = Manifest.from_state_dict(state_dict, checksums=checksums)
    # A Python file object (not a path) makes write failures surface as
    # OSError with errno (ENOSPC, EROFS), which the caller turns into advice.
    with open(tmp, "wb") as f:
        torch.save(dict(state_dict), f)
        f.flush()
        # Without fsync a power loss after the rename can publish a file of zeros.
        os.fsync(f.fileno())
    return written


def _verify_as(tmp: Path, expected: Manifest, path: Path) -> None:
    try:
        verify(tmp, expected)
    except VerificationError as e:
        raise VerificationError(path, e.problems) from e


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_dict_nbytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data, counting a shared (tied) storage once."""
    seen: dict[int, int] = {}
    for t in state_dict.values():
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _describe_os_error(e: OSError, path: Path, needed: int) -> str:
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent).free
        return (
            f"no space left on the device of {path.parent}: about {_size(needed)} needed, "
            f"{_size(free)} free; HINT: free space or point model_dir elsewhere"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path.parent} is not writable ({e.strerror}); HINT: check its permissions or mount"
    return f"{e.strerror or e} ({type(e).__name__})"


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
