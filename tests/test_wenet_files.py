"""Retention of sharded folders and WeNet's final.pt link, on tiny folders."""

from __future__ import annotations

import os

from wenet_hooks.wenet.files import ShardedRetention, repair_final_link, write_info_yaml


def make_save(model_dir, tag, single=True):
    (model_dir / tag).mkdir()
    (model_dir / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if single:
        (model_dir / f"{tag}.pt").write_bytes(b"y")


def sharded(model_dir):
    return sorted(p.name for p in model_dir.iterdir() if p.is_dir())


def test_keep_last_one_removes_only_verified_older_folders(tmp_path):
    retention = ShardedRetention()
    make_save(tmp_path, "init")
    make_save(tmp_path, "old_run")  # from an earlier process: never touched
    assert retention.after_verified(tmp_path, "init", keep_last=1) == []
    make_save(tmp_path, "step_1", single=False)  # its .pt failed: not reported as verified
    make_save(tmp_path, "epoch_0")
    assert retention.after_verified(tmp_path, "epoch_0", keep_last=1) == [tmp_path / "init"]
    assert sharded(tmp_path) == ["epoch_0", "old_run", "step_1"]
    assert (tmp_path / "init.pt").is_file()


def test_keep_none_and_keep_all(tmp_path):
    make_save(tmp_path, "init")
    assert ShardedRetention().after_verified(tmp_path, "init", keep_last=None) == []
    assert ShardedRetention().after_verified(tmp_path, "init", keep_last=0) == [tmp_path / "init"]
    assert sharded(tmp_path) == []


def test_folder_whose_single_file_vanished_is_kept(tmp_path):
    retention = ShardedRetention()
    make_save(tmp_path, "epoch_0")
    retention.after_verified(tmp_path, "epoch_0", keep_last=1)
    (tmp_path / "epoch_0.pt").unlink()
    make_save(tmp_path, "epoch_1")
    assert retention.after_verified(tmp_path, "epoch_1", keep_last=1) == []
    assert sharded(tmp_path) == ["epoch_0", "epoch_1"]


def test_dangling_final_link_is_repointed(tmp_path):
    (tmp_path / "epoch_4.pt").write_bytes(b"y")
    os.symlink("4.pt", tmp_path / "final.pt")  # what WeNet's train.py leaves
    assert repair_final_link(tmp_path, "epoch_4") is True
    assert os.readlink(tmp_path / "final.pt") == "epoch_4.pt"
    assert repair_final_link(tmp_path, "epoch_4") is False  # valid now: left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_4.pt", "final.pt"]


def test_no_final_link_is_not_created(tmp_path):
    (tmp_path / "epoch_4.pt").write_bytes(b"y")
    assert repair_final_link(tmp_path, "epoch_4") is False  # training did not finish
    assert not (tmp_path / "final.pt").exists()


def test_info_yaml_as_wenet_writes_it(tmp_path):
    path = write_info_yaml(tmp_path, "epoch_1", {"epoch": 1, "tag": "epoch_1", "loss_dict": {"loss": 2.5}})
    assert path.read_text() == "epoch: 1\nloss_dict:\n  loss: 2.5\ntag: epoch_1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.yaml"]
