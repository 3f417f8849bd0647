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


def _records(path) -> dict[str, bytes]:
    """Every record of a torch.save zip, by name without the archive's folder."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}


def test_tensors_written_in_any_order_give_torch_saves_file_bit_for_bit(tmp_path):
    """The file laid out from shapes and filled in the order a gather completes (here: reversed)
    holds, record for record, the bytes torch.save writes for the same dict (its serialization id,
    unique per file, aside)."""
    from wenet_hooks.file.publish import PendingFile

    embed = torch.randn(5, 3)
    state = {"embed": embed, "steps": torch.tensor(7), "half": torch.randn(2, 2).to(torch.bfloat16),
             "empty": torch.zeros(0, 4), "out": embed, "bias": torch.tensor([-0.0, 1.5])}
    entries = [Entry("embed", (5, 3)), Entry("steps", (), torch.int64), Entry("half", (2, 2), torch.bfloat16),
               Entry("empty", (0, 4)), Entry("out", alias_of="embed"), Entry("bias", (2,))]
    pending = PendingFile(tmp_path / "ours.pt", entries)
    for e in reversed(entries):
        if not e.alias_of:
            pending.write(e.key, state[e.key])
    pending.publish()
    torch.save(state, tmp_path / "torch.pt")
    ours, theirs = _records(tmp_path / "ours.pt"), _records(tmp_path / "torch.pt")
    assert sorted(ours) == sorted(theirs)
    different = [name for name in ours if ours[name] != theirs[name]]
    assert different in ([], [".data/serialization_id"])


def test_a_tensor_written_twice_or_missing_publishes_nothing(tmp_path):
    from wenet_hooks.file.publish import PendingFile

    entries = [Entry("a", (2,)), Entry("b", (2,))]
    pending = PendingFile(tmp_path / "x.pt", entries)
    pending.write("a", torch.ones(2))
    with pytest.raises(ValueError, match=r"^'a': written twice$"):
        pending.write("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []
    pending = PendingFile(tmp_path / "x.pt", entries)
    pending.write("b", torch.ones(2))
    with pytest.raises(ValueError, match=r"^1 entries were never written \(first: 'a'\)$"):
        pending.publish()
    assert list(tmp_path.iterdir()) == []
