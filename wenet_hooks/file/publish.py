"""Publishing a file atomically: it appears at its final path only once it is
complete, on disk and verified.

It is written to ``<name>.tmp`` in the same folder, fsynced, checked, then
renamed over the final path with ``os.replace`` (atomic within one file
system), and the folder is fsynced so the rename itself survives a power loss.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

from wenet_hooks.errors import CheckpointWriteError, FirstError, VerificationError
from wenet_hooks.file.manifest import Manifest
from wenet_hooks.file.verify import verify as verify_file
from wenet_hooks.file.writer import Entry, FileWriter, OnTensor, Value, entries_for

logger = logging.getLogger(__name__)

# Suffix of the file being written. A leftover one (a crash mid-write) is
# recognised by this suffix and removed by the next write of the same path.
TMP_SUFFIX = ".tmp"

# How a sealed file is verified against what it must hold: in this process (verify), or in a helper process
# (a background save's: wenet_hooks.file.verifier). Raises VerificationError.
Verify = Callable[[Path, Manifest], None]


def tmp_path_for(path: Union[str, Path]) -> Path:
    """Where ``path`` is written before it is published."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def write_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: Union[str, Path],
    *,
    expected: Optional[Manifest] = None,
    verify: bool = True,
) -> Path:
    """Write ``state_dict`` as ONE regular file at ``path``, atomically.

    The file loads with ``torch.load(path, map_location="cpu", mmap=True,
    weights_only=True)``; tensors that share a storage (tied weights) are
    stored once. With ``verify`` (the default) the written bytes are reopened
    and checked before the file is published: against ``expected`` if given
    (e.g. the model's keys and shapes), else against ``state_dict`` itself,
    checksummed as it is written. On any failure nothing exists at ``path``
    that was not there before, and no temporary file is left.

    Raises:
        CheckpointWriteError: the folder is missing or unwritable, the disk is
            full, or ``path`` is a folder.
        VerificationError: the written file does not hold what was expected.
    """
    entries, tensors = entries_for(state_dict)
    return write_entries(entries, tensors, path, verify=verify, expected=expected)


def write_entries(entries: list[Entry], tensors: Iterable[Value], path: Union[str, Path], *,
                  verify: bool = True, expected: Optional[Manifest] = None,
                  on_tensor: Optional[OnTensor] = None) -> Path:
    """Write a file described by ``entries``; ``tensors`` yields the non-alias entries' values in order.

    The values may be produced lazily (a reader of an existing checkpoint),
    so memory holds one tensor at a time where torch allows it, and may be
    :class:`~wenet_hooks.file.writer.Pieces` (written part by part, never assembled).

    Raises:
        CheckpointWriteError, VerificationError: as :func:`write_state_dict`.
        ValueError: a produced tensor does not have its entry's shape or dtype.
    """
    pending = PendingFile(path, entries, verify=verify, expected=expected)
    values = iter(tensors)
    for e in entries:
        if not e.alias_of:
            tensor = next(values)
            pending.write(e.key, tensor)
            if on_tensor is not None:
                on_tensor(tensor)
    return pending.publish()


def open_writer(tmp: Path, entries: list[Entry], checksums: bool) -> FileWriter:
    """The writer every publication writes ``tmp`` through (tests inject file-system faults here)."""
    return FileWriter(tmp, entries, checksums=checksums)


class PendingFile:
    """The one publishing path of the package: ``<path>.tmp`` -> fsync -> verify -> rename.

    Tensors are written as they come, in any order (:meth:`write`), or part by
    part (:meth:`write_part`), so a gather can hand each fragment over as it
    arrives; :meth:`publish` makes the
    file appear at ``path`` complete, on disk and verified, or :meth:`discard`
    removes it. On any failure nothing exists at ``path`` that was not there
    before, and no temporary file is left.

    ``verifier`` checks the sealed file (default: in this process; a background
    save's: in its helper process, :mod:`wenet_hooks.file.verifier`).

    Raises (each method):
        CheckpointWriteError: the folder is missing or unwritable, the disk is
            full, or ``path`` is a folder.
        VerificationError: the written file does not hold what was expected.
        ValueError: a tensor does not fit its entry, or an entry was never written.
    """

    def __init__(self, path: Union[str, Path], entries: list[Entry], *, verify: bool = True,
                 expected: Optional[Manifest] = None, verifier: Verify = verify_file) -> None:
        self.path, self.verify, self.expected, self.verifier = Path(path), verify, expected, verifier
        self.nbytes = sum(e.nbytes for e in entries)
        self.tmp = tmp_path_for(self.path)
        self.started = time.perf_counter()
        self.writer: Optional[FileWriter] = None
        self.sealed = False
        self.failure = FirstError()  # of receive / receive_part: a gather's end, which must go on
        _check_target(self.path)
        try:
            self.writer = open_writer(self.tmp, entries, verify and expected is None)
        except BaseException as e:
            self._fail(e)

    def write(self, key: str, value: Value) -> None:
        """Write the value of entry ``key``; the caller may drop it afterwards."""
        try:
            assert self.writer is not None, "written after it was published or discarded"
            self.writer.write(key, value)
        except BaseException as e:
            self._fail(e)

    def write_part(self, key: str, start: int, part: torch.Tensor) -> None:
        """Write ``part`` as the elements of entry ``key`` from ``start`` on (:meth:`FileWriter.write_part`)."""
        try:
            assert self.writer is not None, "written after it was published or discarded"
            self.writer.write_part(key, start, part)
        except BaseException as e:
            self._fail(e)

    def receive(self, key: str, value: Value) -> None:
        """:meth:`write` for a gather, which must go on to its end on every rank: the first failure is
        kept in :attr:`failure` (``.tmp`` removed) and what follows is dropped."""
        if not self.failure:
            try:
                self.write(key, value)
            except Exception as e:
                self.failure.record(f"writing {self.path}", e)

    def receive_part(self, key: str, start: int, part: torch.Tensor) -> None:
        """:meth:`write_part` as :meth:`receive` does :meth:`write`."""
        if not self.failure:
            try:
                self.write_part(key, start, part)
            except Exception as e:
                self.failure.record(f"writing {self.path}", e)

    def publish(self) -> Path:
        """fsync, verify, rename, fsync the folder: the file at ``path``."""
        self.seal()
        try:
            self.rename()
            fsync_dir(self.path.parent)
        except BaseException as e:
            self._fail(e)
        self.log_published()
        return self.path

    def seal(self) -> None:
        """Close, fsync and verify ``<path>.tmp``; it is renamed by :meth:`rename` (a save's files are all
        sealed before any is renamed: :mod:`wenet_hooks.file.commit`)."""
        if self.sealed:
            return
        try:
            assert self.writer is not None, "sealed after it was discarded"
            written = self.writer.close()
            self.writer = None
            if self.verify:
                _verify_as(self.tmp, self.expected or written, self.path, self.verifier)
        except BaseException as e:
            self._fail(e)
        self.sealed = True

    def rename(self) -> None:
        """The sealed ``<path>.tmp`` to ``path`` (the folder's fsync is the caller's).

        Raises:
            CheckpointWriteError: the file system refused (the ``.tmp`` is the caller's to discard).
        """
        with naming(self.path):
            replace_file(self.tmp, self.path)

    def log_published(self) -> None:
        size, seconds = self.path.stat().st_size, time.perf_counter() - self.started
        logger.info("wrote %s (%.1f MB, %.0f MB/s)", self.path, size / 1e6, size / 1e6 / max(seconds, 1e-9))

    def discard(self) -> None:
        """Remove what was written (idempotent)."""
        if self.writer is not None:
            self.writer.abandon()
            self.writer = None
        _remove_quietly(self.tmp)

    def _fail(self, e: BaseException) -> None:
        self.discard()
        if isinstance(e, OSError):
            raise CheckpointWriteError(self.path, _os_error_text(e, self.path, self.nbytes)) from e
        raise e


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


def _verify_as(tmp: Path, expected: Manifest, path: Path, verifier: Verify) -> None:
    try:
        verifier(tmp, expected)
    except VerificationError as e:
        raise VerificationError(path, e.problems) from e


@contextlib.contextmanager
def naming(path: Path, needed: int = 0) -> Iterator[None]:
    """An ``OSError`` raised inside becomes a :class:`CheckpointWriteError` naming ``path`` (with a hint
    for a full or read-only disk)."""
    try:
        yield
    except OSError as e:
        raise CheckpointWriteError(path, _os_error_text(e, path, needed)) from e


def replace_file(tmp: Path, path: Path) -> None:
    """``os.replace``: every rename that publishes a file goes through here (tests kill the process here)."""
    os.replace(tmp, path)


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` survive a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error_text(e: OSError, path: Path, needed: int) -> str:
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
