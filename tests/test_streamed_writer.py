"""The streamed writer (torch >= 2.6): faults injected into its own ``pwrite`` and ``fsync``, and its
file against ``torch.save`` of the same dict. (torch.save's own writer: tests/test_publish.py.)"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from wenet_hooks import CheckpointWriteError
from wenet_hooks.compat import can_stream
from wenet_hooks.file.layout import Entry
from wenet_hooks.file.publish import write_entries

pytestmark = pytest.mark.skipif(not can_stream(), reason="the streamed writer needs "
                                "torch.serialization.skip_data (torch >= 2.6)")


@pytest.mark.parametrize("fail_at", [1, 3], ids=["first tensor", "third tensor"])
def test_pwrite_failing_mid_file_publishes_nothing(tmp_path, monkeypatch, fail_at):
    """ENOSPC from the streamed writer's own pwrite, after some bytes landed: nothing at the path, no .tmp."""

    calls = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == fail_at:
            real(fd, bytes(data[:2]), offset)  # a few bytes land, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    entries = [Entry(name, (64,)) for name in "abc"]
    (tmp_path / "x.pt").write_bytes(b"the previous save")
    with pytest.raises(CheckpointWriteError, match=r"^could not write .*x\.pt: no space left on the device of "):
        write_entries(entries, iter([torch.randn(64) for _ in entries]), tmp_path / "x.pt")
    assert len(calls) == fail_at
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
    assert (tmp_path / "x.pt").read_bytes() == b"the previous save"


def test_fsync_failing_publishes_nothing(tmp_path, monkeypatch):
    """EIO from the fsync of the written file (the data never reached the disk): nothing is published."""
    real = os.fsync
    tmp = tmp_path / "x.pt.tmp"

    def fsync(fd):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(tmp):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointWriteError, match=r"^could not write .*x\.pt: Input/output error \(OSError\)$"):
        write_entries([Entry("a", (8,))], iter([torch.ones(8)]), tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []
