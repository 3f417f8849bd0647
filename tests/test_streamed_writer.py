"""The streamed writer (torch >= 2.6): faults injected into its own ``pwrite`` and ``fsync``, and its
file against ``torch.save`` of the same dict. (torch.save's own writer: tests/test_publish.py.)"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from wenet_hooks import CheckpointWriteError
from wenet_hooks.compat import can_stream
from wenet_hooks.file.publish import write_entries
from wenet_hooks.file.writer import Entry

pytestmark = pytest.mark.skipif(not can_stream(), reason="the streamed writer needs "
                                "torch.serialization.skip_data (torch >= 2.6)")


@pytest.fixture(autouse=True)
def fresh_layout(monkeypatch):
    """Each test lays its first file out with torch.save: no skeleton kept from another test's entries."""
    import wenet_hooks.file.skeleton as skeleton

    monkeypatch.setattr(skeleton, "_KEPT", type(skeleton._KEPT)())


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


def test_a_kept_skeleton_failing_to_be_written_publishes_nothing(tmp_path, monkeypatch):
    """ENOSPC while the second file of the same entries is made from the kept skeleton (its first
    pwrite: the zip's first header, before any tensor): nothing at the path, no .tmp."""
    entries = [Entry(name, (64,)) for name in "abc"]
    write_entries(entries, iter([torch.randn(64) for _ in entries]), tmp_path / "first.pt")
    (tmp_path / "x.pt").write_bytes(b"the previous save")

    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(torch, "save", lambda *a, **k: pytest.fail("laid out by torch.save again"))
    with pytest.raises(CheckpointWriteError, match=r"^could not write .*x\.pt: no space left on the device of "):
        write_entries(entries, iter([torch.randn(64) for _ in entries]), tmp_path / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.pt", "x.pt"]
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


def test_pieces_are_written_part_by_part_as_torch_save_writes_the_whole(tmp_path):
    """A value given as pieces (how the converter hands over the ranks' slices of a parameter, never
    assembled) gives the file torch.save writes for the assembled tensor, CRC-32s included (zipfile's
    own check reads every record), and the same manifest checksums."""
    from wenet_hooks.file.writer import Pieces
    from wenet_hooks.file.publish import PendingFile

    weight, half = torch.randn(4, 5), torch.randn(7).to(torch.bfloat16)
    flat = torch.cat([torch.randn(3), weight.reshape(-1), torch.randn(2)])  # a rank's partition, padded
    pieces = {"weight": Pieces((4, 5), torch.float32, (flat[3:9], flat[9:9], flat[9:23])),
              "half": Pieces((7,), torch.bfloat16, (half[:1], half[1:])),
              "none": Pieces((0, 3), torch.float32, ())}
    state = {"weight": weight, "half": half, "none": torch.zeros(0, 3)}
    entries = [Entry("weight", (4, 5)), Entry("half", (7,), torch.bfloat16), Entry("none", (0, 3))]
    pending = PendingFile(tmp_path / "ours.pt", entries)
    for key, value in pieces.items():
        pending.write(key, value)
    pending.publish()
    assert_is_torch_saves_file(tmp_path / "ours.pt", state)
    assert {k: v.tensor().tolist() for k, v in pieces.items()} == {k: v.tolist() for k, v in state.items()}


def test_fragments_in_any_order_give_torch_saves_file_bit_for_bit(tmp_path):
    """A gather's fragments written where they belong as they arrive (a parameter's tail from the
    next rank before its head, two parameters interleaved, a run of chunks from one rank): the file
    holds, record for record, torch.save's bytes for the assembled dict, and its zip CRC-32s, taken
    run by run and combined, are right (zipfile's own check reads every record)."""
    from wenet_hooks.file.publish import PendingFile

    weight, half = torch.randn(40, 30), torch.randn(1000).to(torch.bfloat16)
    state = {"weight": weight, "half": half}
    pending = PendingFile(tmp_path / "ours.pt", [Entry("weight", (40, 30)), Entry("half", (1000,), torch.bfloat16)])
    for key, start, end in [("weight", 700, 800), ("weight", 800, 1200), ("half", 512, 1000), ("weight", 0, 300),
                            ("half", 0, 512), ("weight", 300, 700)]:
        pending.write_part(key, start, state[key].reshape(-1)[start:end])
    pending.publish()
    assert_is_torch_saves_file(tmp_path / "ours.pt", state)


def test_a_second_file_of_the_same_entries_is_laid_out_from_the_first_bit_for_bit(tmp_path, monkeypatch):
    """Every save of a model lays out the same skeleton: the second is made from the first's bytes (no
    torch.save, whose pickler is Python on the background thread), and is the same file, byte for byte,
    torch.save's record for record (the first's serialization id, as the first itself has it)."""
    import wenet_hooks.file.skeleton as skeleton
    from wenet_hooks.file.publish import PendingFile

    embed = torch.randn(50, 30)
    state = {"embed": embed, "steps": torch.tensor(7), "half": torch.randn(2, 2).to(torch.bfloat16),
             "empty": torch.zeros(0, 4), "out": embed, "bias": torch.tensor([-0.0, 1.5])}
    entries = [Entry("embed", (50, 30)), Entry("steps", (), torch.int64), Entry("half", (2, 2), torch.bfloat16),
               Entry("empty", (0, 4)), Entry("out", alias_of="embed"), Entry("bias", (2,))]

    def write(name: str) -> None:
        pending = PendingFile(tmp_path / name, entries)
        for e in reversed(entries):
            if not e.alias_of:
                pending.write(e.key, state[e.key])
        pending.publish()

    write("first.pt")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", lambda *a, **k: pytest.fail("laid out by torch.save again"))
        write("second.pt")
    assert (tmp_path / "second.pt").read_bytes() == (tmp_path / "first.pt").read_bytes()
    assert_is_torch_saves_file(tmp_path / "second.pt", state)
    entries[0] = Entry("embed", (30, 50))  # another shape: another skeleton, laid out by torch.save
    state["embed"] = state["out"] = embed.reshape(30, 50)
    write("third.pt")
    assert_is_torch_saves_file(tmp_path / "third.pt", state)
    assert len(skeleton._KEPT) == 2


def assert_is_torch_saves_file(path, state) -> None:
    """``path`` holds, record for record, the bytes torch.save writes for ``state`` (its serialization
    id, unique per file, aside), and its zip CRC-32s are right (zipfile's own check reads every record)."""
    import zipfile

    torch.save(state, path.with_name("torch.pt"))
    ours, theirs = _records(path), _records(path.with_name("torch.pt"))
    assert [name for name in ours if ours[name] != theirs.get(name)] in ([], [".data/serialization_id"])
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None


@pytest.mark.parametrize("parts, problem", [
    ((torch.ones(3),), r"its parts hold 3 values; laid out as torch.float32\[2, 2\] \(4 values\)"),
    ((torch.ones(2), torch.ones(2, dtype=torch.float64)), r"its parts hold 4 values, one of them torch.float64"),
])
def test_pieces_that_do_not_fit_publish_nothing(tmp_path, parts, problem):
    from wenet_hooks.file.writer import Pieces

    with pytest.raises(ValueError, match=rf"^'w': {problem}"):
        write_entries([Entry("w", (2, 2))], iter([Pieces((2, 2), torch.float32, parts)]), tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_the_disks_writes_start_as_the_values_land_in_batches(tmp_path, monkeypatch):
    """The disk is asked to start writing each value's bytes once enough of them wait in the page
    cache (not all at the final fsync): values in file order are handed over as one range (the
    records' headers between them included), a value out of order hands over what waits first;
    the file is the same either way."""
    import wenet_hooks.file.writer as layout
    import wenet_hooks.file.writeback as writeback
    from wenet_hooks.file.writer import Pieces
    from wenet_hooks.file.publish import PendingFile

    started = []
    real = writeback.start_writeback
    monkeypatch.setattr(writeback, "start_writeback", lambda fd, offset, n: (started.append((offset, n)),
                                                                             real(fd, offset, n)))
    monkeypatch.setattr(writeback, "BATCH_BYTES", 6000)
    values = {"a": torch.randn(1000), "b": torch.randn(30, 7), "c": torch.randn(300)}  # 4000, 840, 1200 bytes
    entries = [Entry(k, tuple(v.shape)) for k, v in values.items()]
    for order in ("abc", "cab"):
        started.clear()
        pending = PendingFile(tmp_path / f"{order}.pt", entries)
        for key in order:
            b = values[key].reshape(-1)
            pending.write(key, Pieces(tuple(values[key].shape), torch.float32, (b[:100], b[100:])) if key == "b"
                          else values[key])
        at = pending.writer.offsets
        pending.publish()
        if order == "abc":
            assert started == [(at["a"], at["c"] + 1200 - at["a"])]
        else:  # c waits; a does not continue it, so c goes; a and b (4000 + 840 bytes) wait for the fsync
            assert started == [(at["c"], 1200)]
        loaded = torch.load(tmp_path / f"{order}.pt", weights_only=True)
        assert all(torch.equal(loaded[k], v) for k, v in values.items())
    assert layout.Writeback is writeback.Writeback
