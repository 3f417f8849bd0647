"""write_state_dict(): one regular file, published atomically or not at all."""

from __future__ import annotations

import errno
import re
import shutil
from collections import OrderedDict

import pytest
import torch

import wenet_hooks.file.writer as layout_module
from helpers import small_disk
from wenet_hooks import CheckpointWriteError, Manifest, VerificationError, write_state_dict


# Every test runs against both writers: the streamed one (torch >= 2.6) and torch.save.
pytestmark = pytest.mark.usefixtures("writer")


@pytest.fixture
def state_dict():
    embed = torch.randn(4, 3)
    return OrderedDict([("embed.weight", embed), ("output.weight", embed), ("steps", torch.tensor(3))])


def test_written_file_loads_as_wenet_loads_it(tmp_path, state_dict):
    path = write_state_dict(state_dict, tmp_path / "epoch_0.pt", expected=Manifest.from_state_dict(state_dict))
    loaded = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    assert list(loaded) == list(state_dict)
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    assert loaded["embed.weight"].untyped_storage().data_ptr() == loaded["output.weight"].untyped_storage().data_ptr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0.pt"]


def _failing_save(exc):
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # the first bytes, then the failure
        raise exc

    return save


def test_failure_mid_write_leaves_nothing(tmp_path, state_dict, monkeypatch):
    monkeypatch.setattr(layout_module.torch, "save", _failing_save(RuntimeError("killed mid-write")))
    with pytest.raises(RuntimeError, match="^killed mid-write$"):
        write_state_dict(state_dict, tmp_path / "epoch_0.pt")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_file(tmp_path, state_dict, monkeypatch):
    path = tmp_path / "epoch_0.pt"
    path.write_bytes(b"previous")
    monkeypatch.setattr(layout_module.torch, "save", _failing_save(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        write_state_dict(state_dict, path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0.pt"]


def test_disk_full_says_where_and_how_much(tmp_path, state_dict, monkeypatch):
    monkeypatch.setattr(layout_module.torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left on device")))
    path = tmp_path / "epoch_0.pt"
    with pytest.raises(CheckpointWriteError) as info:
        write_state_dict(state_dict, path)
    assert info.value.path == path
    assert re.fullmatch(
        rf"could not write {re.escape(str(path))}: no space left on the device of {re.escape(str(tmp_path))}: "
        r"about 56 bytes needed, [0-9.]+ [kMG]B free; HINT: free space or point model_dir elsewhere",
        str(info.value),
    )
    assert list(tmp_path.iterdir()) == []


def test_a_really_full_disk_says_where_and_how_much(tmp_path):
    """A real full tmpfs: torch < 2.6's writer reports it as ``unexpected pos``; both writers say ENOSPC."""
    state_dict = {"big": torch.zeros(256, 1024)}  # 1 MiB on a 256 KiB disk
    with small_disk(tmp_path, 256 * 1024) as disk:
        path = disk / "epoch_0.pt"
        with pytest.raises(CheckpointWriteError) as info:
            write_state_dict(state_dict, path)
        assert re.fullmatch(
            rf"could not write {re.escape(str(path))}: no space left on the device of {re.escape(str(disk))}: "
            r"about 1.0 MB needed, [0-9.]+ (bytes|[kMG]B) free; HINT: free space or point model_dir elsewhere",
            str(info.value))
        assert list(disk.iterdir()) == []


def test_torch_save_reporting_a_full_disk_as_unexpected_pos(tmp_path, state_dict, monkeypatch):
    """torch < 2.6 raises RuntimeError('... unexpected pos N vs M') when the disk fills up."""
    monkeypatch.setattr(layout_module, "can_stream", lambda: False)  # the torch.save writer
    monkeypatch.setattr(layout_module.torch, "save", _failing_save(
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 512 vs 406")))
    monkeypatch.setattr(layout_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 3))
    with pytest.raises(CheckpointWriteError, match=r"no space left on the device of .*: about 56 bytes needed, "
                       r"3 bytes free; HINT"):
        write_state_dict(state_dict, tmp_path / "epoch_0.pt")
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_publishes_nothing(tmp_path, state_dict):
    wrong = Manifest.from_state_dict(OrderedDict(state_dict, extra=torch.zeros(1)))
    with pytest.raises(VerificationError, match=r"epoch_0\.pt failed verification \(1 problem\(s\)\):\n  - missing key 'extra'"):
        write_state_dict(state_dict, tmp_path / "epoch_0.pt", expected=wrong)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_file_from_a_crash_is_replaced(tmp_path, state_dict):
    (tmp_path / "epoch_0.pt.tmp").write_bytes(b"left by a killed rank 0")
    write_state_dict(state_dict, tmp_path / "epoch_0.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0.pt"]


def test_folder_shaped_target_is_refused_with_a_hint(tmp_path, state_dict):
    (tmp_path / "epoch_0.pt").mkdir()
    (tmp_path / "epoch_0.pt" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointWriteError, match=r"a folder of that name exists .*HINT: convert it with `wenet-hooks-convert"):
        write_state_dict(state_dict, tmp_path / "epoch_0.pt")
    assert (tmp_path / "epoch_0.pt" / "pytorch_model.bin").read_bytes() == b"x"


def test_missing_folder(tmp_path, state_dict):
    with pytest.raises(CheckpointWriteError, match=f"^could not write {tmp_path}/nope/e.pt: the folder {tmp_path}/nope does not exist$"):
        write_state_dict(state_dict, tmp_path / "nope" / "e.pt")
