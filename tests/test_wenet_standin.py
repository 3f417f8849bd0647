"""The WeNet integration, end to end, against the WeNet-shaped stand-in.

CI cannot install WeNet, so ``tests/standin/wenet`` stands in for it: it
imports ``save_model`` and ``check_modify_and_save_config`` BY NAME exactly as
WeNet's ``train.py`` and ``executor.py`` do and calls them at the same points
(``init``, ``step_N``, ``epoch_N``); see tests/standin/README.md. Each test
launches it like a user launches WeNet (``torchrun .../wenet/bin/train.py``),
on 2 real DeepSpeed ranks (gloo), with nothing but the installed package and
a ``wenet_hooks`` section in train.yaml: the start-up hook does the rest.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml

from conftest import STANDIN, run_torchrun
from helpers import assert_state_dicts_equal, deepspeed_reference
from support.tiny_model import build_model
from support.tiny_training import ds_config

pytestmark = [pytest.mark.multirank, pytest.mark.usefixtures("deepspeed_trains")]

TRAIN_PY = STANDIN / "wenet" / "bin" / "train.py"


def write_configs(tmp_path, stage, section=None, **configs):
    """train.yaml (with an optional wenet_hooks section) and a DeepSpeed json."""
    if section is not None:
        configs["wenet_hooks"] = section
    configs.setdefault("max_epoch", 1)  # WeNet's default is 100
    (tmp_path / "train.yaml").write_text(yaml.dump(configs))
    (tmp_path / "ds.json").write_text(json.dumps(ds_config(stage)))


def train(tmp_path, save_states, *extra, env=None, check=True, module=False, nproc=2):
    """Launch the stand-in's train.py as a WeNet user would, on 2 ranks (a later --model_dir wins)."""
    args = ["--train_engine", "deepspeed", "--deepspeed_config", str(tmp_path / "ds.json"),
            "--deepspeed.save_states", save_states, "--config", str(tmp_path / "train.yaml"),
            "--model_dir", str(tmp_path / "exp"), *extra]
    if module:  # python -m wenet_hooks.train, through torchrun's -m
        return run_torchrun("-m", "wenet_hooks.train", *args, env=env, check=check, nproc=nproc)
    return run_torchrun(TRAIN_PY, *args, env=env, check=check, nproc=nproc)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def load(path):
    return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)


def assert_recognize_ready(path):
    """One regular file that loads strictly into a fresh model."""
    assert path.is_file() and not path.is_symlink(), path
    build_model(seed=5).load_state_dict(load(path), strict=True)


def test_model_and_optimizer_zero2_steps_epochs_and_retention(tmp_path):
    section = {"consolidate": {"enabled": True, "keep_sharded": 1}}
    write_configs(tmp_path, stage=2, section=section, save_interval=2)
    proc = train(tmp_path, "model+optimizer", env={"STANDIN_STEPS": "4"})
    exp = tmp_path / "exp"
    tags = ["init", "step_1", "step_3", "epoch_0"]
    for tag in tags:
        assert_recognize_ready(exp / f"{tag}.pt")
        assert (exp / f"{tag}.yaml").is_file()
        assert (exp / f"{tag}.optim").is_file()  # model+optimizer: the optimizer too, for exact resume
    # WeNet's average_model.py takes every model_dir/[!init]*.pt for a model (by mtime, without
    # --val_best) and loads it with strict=False: nothing the package writes may match unless it is one.
    averaged = sorted(p.name for p in exp.glob("[!init]*.pt"))
    assert averaged == ["epoch_0.pt", "final.pt", "step_1.pt", "step_3.pt"]
    for name in averaged:
        build_model(seed=5).load_state_dict(load(exp / name), strict=True)
    # With --val_best it reads each <tag>.yaml and opens <tag>.pt.
    assert sorted(p.stem for p in exp.glob("*.yaml") if p.name != "train.yaml") == sorted(tags)
    # keep_sharded: 1 kept only the newest sharded folder, each removed one after its .pt verified.
    assert [t for t in tags if (exp / t).is_dir()] == ["epoch_0"]
    assert_state_dicts_equal(load(exp / "epoch_0.pt"), deepspeed_reference(exp, "epoch_0", build_model()))
    assert os.readlink(exp / "final.pt") == "epoch_0.pt"
    assert proc.stderr.count("wenet_hooks: installed into WeNet (") == 2  # once per rank
    assert "wenet_hooks: writing <model_dir>/<tag>.pt at every init/step/epoch save" in proc.stderr
    # The other saves gather the optimizer state in the background; WeNet destroys the process
    # group right after its last one (steps mode: epoch_0), so that one gathers it at once.
    assert proc.stderr.count("is WeNet's last save") == 1
    assert "wenet_hooks: epoch_0 is WeNet's last save: it is gathered before training ends" in proc.stderr


def test_model_only_zero3_writes_single_files_and_nothing_sharded(tmp_path):
    write_configs(tmp_path, stage=3, section={"consolidate": {"enabled": True}}, max_epoch=2)
    train(tmp_path, "model_only")
    exp = tmp_path / "exp"
    assert listing(exp) == ["epoch_0.pt", "epoch_0.yaml", "epoch_1.pt", "epoch_1.yaml", "final.pt",
                            "init.pt", "init.yaml", "latest_save", "train.yaml"]
    for tag in ("init", "epoch_0", "epoch_1"):
        assert_recognize_ready(exp / f"{tag}.pt")
    assert os.readlink(exp / "final.pt") == "epoch_1.pt"
    assert (exp / "latest_save").read_text() == "epoch_1\n"  # the newest committed save
    info = yaml.load((exp / "epoch_1.yaml").read_text(), Loader=yaml.FullLoader)
    assert (info["tag"], info["epoch"], info["save_states"]) == ("epoch_1", 1, "model_only")
    assert not torch.equal(load(exp / "init.pt")["encoder.encoders.0.linear.weight"],
                           load(exp / "epoch_1.pt")["encoder.encoders.0.linear.weight"])


@pytest.mark.parametrize("how", ["flag off", "WENET_HOOKS_DISABLE=1", "no section"])
def test_inactive_leaves_wenet_exactly_as_it_was(tmp_path, how):
    section = {"consolidate": {"enabled": how != "flag off"}} if how != "no section" else None
    write_configs(tmp_path, stage=2, section=section)
    env = {"WENET_HOOKS_DISABLE": "1"} if how.startswith("WENET") else None
    proc = train(tmp_path, "model_only", env=env)
    exp = tmp_path / "exp"
    # WeNet's own model_only path: DeepSpeed's converter leaves a FOLDER named epoch_0.pt.
    assert (exp / "epoch_0.pt").is_dir() and listing(exp / "epoch_0.pt") == ["pytorch_model.bin"]
    assert os.readlink(exp / "final.pt") == "0.pt"  # WeNet's dangling link, untouched
    assert ("installed into WeNet" in proc.stderr) is (how != "WENET_HOOKS_DISABLE=1")
    inactive = "wenet_hooks: section present but inactive (consolidate.enabled is false): WeNet saves as usual"
    assert (inactive in proc.stderr) is (how == "flag off")


def test_invalid_section_stops_before_training(tmp_path):
    section = {"consolidate": {"enabled": True, "dtype": "f32", "keep_sharded": "last", "verfiy": False}}
    write_configs(tmp_path, stage=2, section=section)
    proc = train(tmp_path, "model+optimizer", check=False)
    assert proc.returncode != 0
    assert (
        "invalid wenet_hooks configuration (3 problem(s)):\n"
        "  - wenet_hooks.consolidate.dtype: expected one of fp32, bf16, fp16; found 'f32'\n"
        "  - wenet_hooks.consolidate.keep_sharded: expected all, none or a number of folders to keep; found 'last'\n"
        "  - wenet_hooks.consolidate.verfiy: unknown key; expected one of enabled, dtype, verify, on_error, "
        "keep_sharded, tags, bucket_mb"
    ) in re.sub(r"(?m)^\[rank\d\]: ", "", proc.stderr)  # torchrun prefixes each rank's traceback
    assert listing(tmp_path / "exp") == ["train.yaml"]  # WeNet's copy of the config; no init save


def test_explicit_entry_and_override_config(tmp_path):
    section = {"consolidate": {"enabled": False, "dtype": "fp32", "tags": ["epoch"]}}
    write_configs(tmp_path, stage=2, section=section)
    overrides = ["--override_config", "wenet_hooks.consolidate.enabled true",
                 "--override_config", "wenet_hooks.consolidate.dtype bf16"]
    train(tmp_path, "model+optimizer", *overrides, env={"WENET_HOOKS_DISABLE": "1"}, module=True)
    exp = tmp_path / "exp"
    assert not (exp / "init.pt").exists()  # tags: [epoch]
    assert (exp / "init").is_dir()
    saved = load(exp / "epoch_0.pt")
    assert saved["encoder.embed.weight"].dtype == torch.bfloat16
    reference = deepspeed_reference(exp, "epoch_0", build_model())
    assert_state_dicts_equal(saved, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                     for k, v in reference.items()})


def test_on_error_warn_keeps_training_and_the_data(tmp_path):
    """A save that cannot be written (a folder-shaped init.pt is in the way) with on_error: warn."""
    write_configs(tmp_path, stage=2, section={"consolidate": {"enabled": True, "on_error": "warn"}})
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "init.pt").mkdir()
    proc = train(tmp_path, "model_only")
    exp = tmp_path / "exp"
    # model_only wrote nothing else for init, so DeepSpeed's sharded checkpoint was kept instead.
    assert (exp / "init").is_dir() and (exp / "init.pt").is_dir()
    assert_recognize_ready(exp / "epoch_0.pt")
    assert (f"wenet_hooks: on_error is warn: training goes on. save 'init' failed on rank 0 while writing "
            f"{exp / 'init.pt'}: could not write {exp / 'init.pt'}: a folder of that name exists") in proc.stderr
    assert f"convert it later with `wenet-hooks-convert model_dir={exp} tag=init`" in proc.stderr


def test_on_error_stop_stops_every_rank_with_the_reason(tmp_path):
    write_configs(tmp_path, stage=3, section={"consolidate": {"enabled": True}})
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "init.pt").mkdir()
    proc = train(tmp_path, "model+optimizer", check=False)
    assert proc.returncode != 0
    stderr = re.sub(r"(?m)^\[rank\d\]: ", "", proc.stderr)
    # model+optimizer: rank 0 writes init.pt in the background; the next save learns it failed.
    path = tmp_path / "exp" / "init.pt"
    reason = (f"SaveError: save 'init' failed on rank 0 while gathering the weights and the optimizer state and "
              f"writing {path} in the background: "
              f"could not write {path}: a folder of that name exists")
    assert stderr.count(reason) == 2  # both ranks raised it, neither hung
    assert stderr.count("where rank 0 raised it:") == 1  # rank 1 carries rank 0's traceback
    assert not (tmp_path / "exp" / "epoch_0").exists()  # stopped before the next save
