"""wenet_hooks inside REAL WeNet (run when WENET_ROOT points to a WeNet checkout).

Runs recipes/tiny/run.sh as a user would: WeNet's own train.py under torchrun
on 2 CPU ranks (gloo) with DeepSpeed, then WeNet's recognize.py on the
produced epoch_N.pt and average_model.py over them. See README.md for the
environment WeNet needs (torch 2.9 + torchaudio 2.9 + torchcodec 0.8).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

WENET_ROOT = os.environ.get("WENET_ROOT")
pytestmark = pytest.mark.skipif(not WENET_ROOT, reason="set WENET_ROOT to a WeNet checkout to run these")

REPO = Path(__file__).resolve().parents[2]
RUN_SH = REPO / "recipes" / "tiny" / "run.sh"
SHIM = Path(__file__).resolve().parent / "shim"


def run_recipe(tmp_path, check=True, **settings):
    env = {**os.environ, "WENET_ROOT": WENET_ROOT, "data": str(tmp_path / "data"), "dir": str(tmp_path / "exp"),
           "PYTHONPATH": str(SHIM), "PYTHONWARNINGS": "ignore", **settings}
    proc = subprocess.run(["bash", str(RUN_SH)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900)
    log = proc.stdout + proc.stderr
    (tmp_path / "run.log").write_text(log)
    if check:
        assert proc.returncode == 0, log[-6000:]
    else:  # killed by the injection, not failed for another reason
        assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in log, "the run was to be killed: " + log[-3000:]
    return log


def wenet_model(config_path):
    sys.path.insert(0, WENET_ROOT)
    import argparse

    from wenet.utils.init_model import init_model

    configs = yaml.load(Path(config_path).read_text(), Loader=yaml.FullLoader)
    model, _ = init_model(argparse.Namespace(checkpoint=None, jit=False), configs)
    return model


def assert_loads_strict(model, path):
    state_dict = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    assert list(state_dict) == list(model.state_dict())


def test_zero2_model_and_optimizer_recognize_and_average(tmp_path):
    log = run_recipe(tmp_path, ds_config=str(REPO / "recipes/tiny/conf/ds_stage2.json"))
    exp = tmp_path / "exp"
    model = wenet_model(exp / "train.yaml")
    for tag in ("init", "epoch_0", "epoch_1"):
        assert_loads_strict(model, exp / f"{tag}.pt")
    assert_loads_strict(model, exp / "avg_2.pt")
    # average_model.py by mtime (no --val_best) over model_dir/[!init]*.pt: only models are there, so
    # the average loads strictly (no exp_avg/... keys, no halved weights) and decodes. It ran before
    # avg_newest.pt was written, so it saw the others only.
    assert sorted(p.name for p in exp.glob("[!init]*.pt")) == [
        "avg_2.pt", "avg_newest.pt", "epoch_0.pt", "epoch_1.pt", "final.pt"]
    averaged = re.findall(r"^Processing (.*)$", log, flags=re.M)[-2:]
    assert averaged and all(Path(p).name in ("avg_2.pt", "epoch_0.pt", "epoch_1.pt", "final.pt") for p in averaged)
    assert_loads_strict(model, exp / "avg_newest.pt")
    assert len((exp / "decode_avg" / "ctc_greedy_search" / "text").read_text().splitlines()) == 16
    assert os.readlink(exp / "final.pt") == "epoch_1.pt"
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == ["decode", "decode_avg", "epoch_1", "tensorboard"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        reference = get_fp32_state_dict_from_zero_checkpoint(str(exp), tag="epoch_1")
    ours = torch.load(exp / "epoch_1.pt", weights_only=True)
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert "missing tensor" not in log and "unexpected tensor" not in log
    for mode in ("ctc_greedy_search", "attention_rescoring"):
        assert len((exp / "decode" / mode / "text").read_text().splitlines()) == 16


def test_zero3_model_only_writes_no_sharded_folder(tmp_path):
    log = run_recipe(tmp_path, ds_config=str(REPO / "recipes/tiny/conf/ds_stage3.json"), save_states="model_only")
    exp = tmp_path / "exp"
    model = wenet_model(exp / "train.yaml")
    for tag in ("init", "epoch_0", "epoch_1"):
        assert_loads_strict(model, exp / f"{tag}.pt")
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == ["decode", "decode_avg", "tensorboard"]
    assert not (exp / "latest").exists()
    assert "missing tensor" not in log and "unexpected tensor" not in log


def whisper_init_checkpoint(tmp_path):
    """A deterministic start: WeNet leaves the learnable decoder PE uninitialised."""
    config = REPO / "recipes/tiny/conf/train_whisper.yaml"
    configs = yaml.load(config.read_text(), Loader=yaml.FullLoader)
    configs["output_dim"] = configs["vocab_size"] = 51866
    torch.manual_seed(0)
    sys.path.insert(0, WENET_ROOT)
    import argparse

    from wenet.utils.init_model import init_model

    model, _ = init_model(argparse.Namespace(checkpoint=None, jit=False), configs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("embed.1.pe"):
                param.normal_(0.0, 0.02)
    path = tmp_path / "whisper_init.pt"
    torch.save(model.state_dict(), path)
    return path


def test_whisper_style_zero3_tied_embedding(tmp_path):
    init = whisper_init_checkpoint(tmp_path)
    log = run_recipe(tmp_path, ds_config=str(REPO / "recipes/tiny/conf/ds_stage3.json"),
                     train_config=str(REPO / "recipes/tiny/conf/train_whisper.yaml"), checkpoint=str(init))
    exp = tmp_path / "exp"
    model = wenet_model(exp / "train.yaml")
    for tag in ("init", "epoch_0", "epoch_1"):
        assert_loads_strict(model, exp / f"{tag}.pt")
    saved = torch.load(exp / "epoch_1.pt", weights_only=True)
    tied = saved["decoder.embed.0.weight"], saved["decoder.output_layer.weight"]
    assert tied[0].untyped_storage().data_ptr() == tied[1].untyped_storage().data_ptr()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        reference = get_fp32_state_dict_from_zero_checkpoint(str(exp), tag="epoch_1")
    assert set(saved) == set(reference)
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
    assert "missing tensor" not in log and "unexpected tensor" not in log
    assert len((exp / "decode" / "attention_rescoring" / "text").read_text().splitlines()) == 16


def train_losses(log, epoch):
    """Rank 0's logged training losses of ``epoch``, by batch: WeNet's 'TRAIN | ... Batch E/B loss X ... rank 0'."""
    found = re.findall(rf"TRAIN \|.*?Batch {epoch}/(\d+) loss ([0-9.]+) .*rank 0$", log, flags=re.M)
    return {int(batch): float(loss) for batch, loss in found}


def deterministic_config(tmp_path, **changes):
    """The tiny recipe with dropout, dither and WeNet's list shuffle off, so two runs see the same
    batches and make the same forwards (``changes``: top-level keys set)."""
    configs = yaml.load((REPO / "recipes/tiny/conf/train.yaml").read_text(), Loader=yaml.FullLoader)
    configs.update(changes)
    for section in ("encoder_conf", "decoder_conf"):
        configs[section]["dropout_rate"] = configs[section]["positional_dropout_rate"] = 0.0
    configs["dataset_conf"]["fbank_conf"]["dither"] = 0.0
    configs["dataset_conf"]["list_shuffle"] = False  # WeNet shuffles the data list by default
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.dump(configs))
    return train_yaml


def resume(tmp_path, train_yaml, name, files, nproc="2"):
    """Copy epoch_0's ``files`` to their own folder (as a user would) and resume WeNet from epoch_0.pt."""
    (tmp_path / name).mkdir()
    for file in files:
        shutil.copy(tmp_path / "exp" / file, tmp_path / name / file)
    return run_recipe(tmp_path, train_config=str(train_yaml), stage="1", stop_stage="1", nproc=nproc,
                      dir=str(tmp_path / f"{name}_exp"), checkpoint=str(tmp_path / name / "epoch_0.pt"))


def test_resume_from_the_single_files_gives_the_uninterrupted_losses(tmp_path):
    """``--checkpoint exp/epoch_0.pt`` with ``epoch_0.optim`` beside it: every loss of epoch 1
    equals the uninterrupted run's. Without it (WeNet's weights-only resume) only the first does.
    An epoch save is used because WeNet restarts an epoch's data from its first batch when it
    resumes, so only there do both runs see the same batches."""
    train_yaml = deterministic_config(tmp_path)
    straight = run_recipe(tmp_path, train_config=str(train_yaml), stop_stage="1", dir=str(tmp_path / "exp"))
    exact = resume(tmp_path, train_yaml, "exact", ["epoch_0.pt", "epoch_0.yaml", "epoch_0.optim"])
    assert "missing tensor" not in exact and "unexpected tensor" not in exact
    assert "wenet_hooks: resumed exactly from" in exact
    expected, got = train_losses(straight, 1), train_losses(exact, 1)
    assert len(expected) >= 2 and train_losses(exact, 0) == {}  # it resumed at epoch 1
    print(f"epoch 1 losses: uninterrupted {expected}, resumed {got}")
    assert got == expected
    weights_only = train_losses(resume(tmp_path, train_yaml, "weights_only", ["epoch_0.pt", "epoch_0.yaml"]), 1)
    assert weights_only[min(expected)] == expected[min(expected)] and weights_only != expected


def test_resume_on_three_ranks_trains_to_the_end(tmp_path):
    train_yaml = deterministic_config(tmp_path)
    run_recipe(tmp_path, train_config=str(train_yaml), stop_stage="1", dir=str(tmp_path / "exp"))
    log = resume(tmp_path, train_yaml, "three", ["epoch_0.pt", "epoch_0.yaml", "epoch_0.optim"], nproc="3")
    assert "saved by ZeRO-2 on 2 ranks, restored onto ZeRO-2 on 3 ranks" in log
    assert (tmp_path / "three_exp" / "epoch_1.pt").is_file() and (tmp_path / "three_exp" / "epoch_1.optim").is_file()


FILES_ONLY = {"consolidate": {"enabled": True, "sharded": False, "resume": "auto"}}


def killed_and_rerun(tmp_path, train_yaml, kills):
    """Rank 0 SIGKILLed at each moment of ``kills`` (tests/inject's environment) in turn, the identical
    command rerun after each; what each kill left on disk, and the log of the run that finished."""
    from wenet_hooks.file.commit import newest_committed

    exp, left = tmp_path / "exp", []
    for moment, env in kills:
        run_recipe(tmp_path, check=False, train_config=str(train_yaml), stage="1", stop_stage="1", **env)
        newest = newest_committed(exp)
        left.append(f"{moment}: {sorted(p.name for p in exp.iterdir() if p.is_file())}; newest committed "
                    f"{newest.name if newest else None}")
    print("\n".join(left))
    return run_recipe(tmp_path, train_config=str(train_yaml), stage="1", stop_stage="1")


def test_files_only_epoch_mode_killed_anywhere_ends_bit_identical(tmp_path):
    """``sharded: false`` + ``resume: auto``, 3 epochs: killed during training, during a background write,
    between renames and before the last save's record, the same command rerun after each; epoch_2.pt and
    epoch_2.optim are byte-identical to an uninterrupted run's."""
    train_yaml = deterministic_config(tmp_path, max_epoch=3, wenet_hooks=FILES_ONLY)
    run_recipe(tmp_path, train_config=str(train_yaml), stop_stage="1", dir=str(tmp_path / "straight"))
    # Two steps an epoch (16 utterances, batches of 4, 2 ranks); each kill is one the rerun reaches.
    log = killed_and_rerun(tmp_path, train_yaml, [
        ("during training, epoch 1", {"WENET_HOOKS_TEST_DIE_AT_STEP": "3"}),
        ("while epoch_1.pt is written", {"WENET_HOOKS_TEST_KILL_WRITING": "epoch_1"}),
        ("between epoch_1.pt's and epoch_1.optim's renames", {"WENET_HOOKS_TEST_KILL_AT": "epoch_1.optim"}),
        ("before epoch_1.yaml's rename", {"WENET_HOOKS_TEST_KILL_AT": "epoch_1.yaml"}),
        ("before latest_save's rename", {"WENET_HOOKS_TEST_KILL_AT": "latest_save"}),
        ("before epoch_2.pt's rename (the last save)", {"WENET_HOOKS_TEST_KILL_AT": "epoch_2.pt"}),
    ])
    assert "wenet_hooks: resume: auto: continuing from" in log
    exp, straight = tmp_path / "exp", tmp_path / "straight"
    for name in ("epoch_2.pt", "epoch_2.optim"):
        assert (exp / name).read_bytes() == (straight / name).read_bytes(), name
    assert_loads_strict(wenet_model(exp / "train.yaml"), exp / "epoch_2.pt")


def test_files_only_steps_mode_killed_anywhere_trains_to_the_end(tmp_path):
    """Steps mode (``save_interval``): killed during training, during a background write, between renames
    and before a record; the same command finishes and every committed save loads strictly."""
    from wenet_hooks.file.commit import committed

    # Steps mode: one pass over the data cycled max_epoch times (8 steps), a save after every second step;
    # a rerun from step_N goes on at step N + 1 for 8 more steps.
    train_yaml = deterministic_config(tmp_path, save_interval=2, max_epoch=4, wenet_hooks=FILES_ONLY)
    run_recipe(tmp_path, stage="0", stop_stage="0")  # the data
    killed_and_rerun(tmp_path, train_yaml, [
        ("during training", {"WENET_HOOKS_TEST_DIE_AT_STEP": "4"}),
        ("while step_5.pt is written", {"WENET_HOOKS_TEST_KILL_WRITING": "step_5"}),
        ("between step_5.pt's and step_5.optim's renames", {"WENET_HOOKS_TEST_KILL_AT": "step_5.optim"}),
        ("before step_5.yaml's rename", {"WENET_HOOKS_TEST_KILL_AT": "step_5.yaml"}),
    ])
    exp = tmp_path / "exp"
    model = wenet_model(exp / "train.yaml")
    saves = [p for p in exp.glob("*.pt") if not p.is_symlink() and committed(p) is None]
    assert {p.stem for p in saves} >= {"init", "epoch_0"}
    for path in saves:
        assert_loads_strict(model, path)
        info = yaml.load(path.with_suffix(".yaml").read_text(), Loader=yaml.FullLoader)
        assert info["tag"] == path.stem  # each yaml is its own save's
