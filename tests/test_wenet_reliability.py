"""Reliability of the WeNet integration over whole training runs, against the WeNet-shaped stand-in.

Like tests/test_wenet_standin.py these launch ``tests/standin/wenet/bin/train.py``
(which imports and calls ``save_model`` exactly as WeNet's train.py and
executor.py do; see tests/standin/README.md) on 2 real DeepSpeed ranks
(gloo). Faults and measurements come from ``tests/inject/sitecustomize.py``,
put on PYTHONPATH by these tests only; the package itself is not modified.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from conftest import TESTS, launch_env
from helpers import assert_state_dicts_equal, deepspeed_reference
from test_convert_cli import convert
from test_wenet_standin import assert_recognize_ready, listing, load, train, write_configs
from wenet_hooks.file.commit import committed, newest_committed
from support.tiny_model import build_model

pytestmark = [pytest.mark.multirank, pytest.mark.usefixtures("deepspeed_trains")]

INJECT = TESTS / "inject"


def instrumented(**env: str) -> dict[str, str]:
    return {"PYTHONPATH": launch_env(INJECT)["PYTHONPATH"], **env}


def test_disk_full_with_on_error_warn_keeps_training_and_the_sharded_folder(tmp_path):
    section = {"consolidate": {"enabled": True, "on_error": "warn", "keep_sharded": 1}}
    write_configs(tmp_path, stage=2, section=section, save_interval=2)
    proc = train(tmp_path, "model+optimizer", env=instrumented(STANDIN_STEPS="6", WENET_HOOKS_TEST_ENOSPC="step_3"))
    exp = tmp_path / "exp"
    # The failed write is reported (where, how much) at the next save; training went on and later saves worked.
    step_3 = re.escape(str(exp / "step_3.pt"))
    # (at step_5's save, under the failed save's own tag)
    assert re.search(rf"^.*wenet_hooks: on_error is warn: training goes on, the sharded folder is kept. save "
                     rf"'step_3' failed on rank 0 while gathering the weights and the optimizer state and writing "
                     rf"{step_3} in the background: "
                     rf"could not write {step_3}: no space left on the device of {re.escape(str(exp))}: "
                     r"about [0-9.]+ kB needed, [0-9.]+ [kMG]B free; HINT: free space or point model_dir elsewhere$",
                     proc.stderr, flags=re.M)
    assert not (exp / "step_3.pt").exists() and not list(exp.glob("*.tmp"))
    for tag in ("init", "step_1", "step_5", "epoch_0"):
        assert_recognize_ready(exp / f"{tag}.pt")
    # keep_sharded 1 removed every verified folder but the newest; step_3 has no .pt, so it stays.
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == ["epoch_0", "step_3"]
    # ... and it still holds the save: the offline command makes the .pt from it later.
    convert(f"model_dir={exp}", "tag=step_3")
    assert_recognize_ready(exp / "step_3.pt")
    assert_state_dicts_equal(load(exp / "step_3.pt"), deepspeed_reference(exp, "step_3", build_model()))


def test_200_saves_in_one_run_do_not_leak(tmp_path):
    saves = 200
    section = {"consolidate": {"enabled": True, "keep_sharded": 1}}
    write_configs(tmp_path, stage=2, section=section, save_interval=1)
    # The stand-in saves after steps 1..N-1 (WeNet's `(step + 1) % save_interval` at step 0 is skipped).
    train(tmp_path, "model+optimizer", env=instrumented(STANDIN_STEPS=str(saves + 1),
                                                       WENET_HOOKS_TEST_PROBE=str(tmp_path)))
    exp = tmp_path / "exp"
    for rank in (0, 1):
        samples = json.loads((tmp_path / f"probe{rank}.json").read_text())
        assert len(samples) == saves + 2  # init, step_1..step_200, epoch_0
        early, late = samples[20], samples[-1]  # after warm-up (allocator pools, DeepSpeed's lazy state)
        print(f"rank {rank}: after save 20 / {len(samples)}: RSS {early['rss_mb']:.1f} / {late['rss_mb']:.1f} MB, "
              f"reachable tensors {early['tensor_mb']:.3f} / {late['tensor_mb']:.3f} MB, "
              f"fds {early['fds']} / {late['fds']}, threads {early['threads']} / {late['threads']}, "
              f"tmp files at most {max(s['tmp_files'] for s in samples)}")
        # One save's copy: the weights rank 0 gathers (the file's size); the optimizer state is twice that.
        # Leaking it at every save would add 180 copies; the tensors Python reaches may not grow by one.
        copy_mb = (exp / "epoch_0.pt").stat().st_size / 2**20
        # (A sample may catch the background save in flight: the least of each window is what stays.)
        held_early = min(s["tensor_mb"] for s in samples[20:50])
        held_late = min(s["tensor_mb"] for s in samples[-30:])
        assert held_late - held_early < copy_mb, samples[::20]
        # Resident memory wanders with the allocator (3-6 MB over these saves: each background job's
        # thread can take a malloc arena of its own until glibc's cap): bounded below what leaking every
        # save's copies (weights and optimizer state, 3 copies' worth) would add.
        leak_mb = (len(samples) - 21) * 3 * copy_mb
        assert late["rss_mb"] - early["rss_mb"] < 0.8 * leak_mb, (leak_mb, samples[::20])
        # +3: the background save in flight when a sample is taken holds its two files open (rank 0
        # writes the weights and the optimizer state as they arrive) and maps one it verifies; a leak
        # would grow with every one of the 180 saves.
        assert max(s["fds"] for s in samples[20:]) <= early["fds"] + 3, samples[::20]
        assert late["threads"] <= early["threads"], samples[::20]
        # At most the save in flight has its .tmp files, the weights', the optimizer state's (both are
        # written as the gathers deliver) and its record's (written once both are sealed); all renamed
        # before the next save returns.
        assert max(s["tmp_files"] for s in samples) <= 3
    assert not list(exp.glob("*.tmp"))
    files = sorted(p for p in exp.glob("*.pt") if not p.is_symlink())
    assert len(files) == saves + 2  # + init and epoch_0 (final.pt is WeNet's link to epoch_0.pt)
    assert len(list(exp.glob("*.optim"))) == saves + 2  # model+optimizer: one optimizer file per save
    for path in files:
        assert_recognize_ready(path)
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == ["epoch_0"]


def resume_from_step_2(tmp_path, name, *, keep_optimizer=True, nproc=2):
    """Move step_2's files to their own folder and resume from them with WeNet's ``--checkpoint``."""
    exp, moved = tmp_path / "exp", tmp_path / name
    moved.mkdir()
    for suffix in (".pt", ".yaml", ".optim"):
        if suffix != ".optim" or keep_optimizer:
            shutil.copy(exp / f"step_2{suffix}", moved / f"step_2{suffix}")
    losses = tmp_path / f"{name}.txt"
    proc = train(tmp_path, "model+optimizer", "--checkpoint", str(moved / "step_2.pt"), "--model_dir",
                 str(tmp_path / f"{name}_exp"), nproc=nproc, env={"STANDIN_STEPS": "3", "STANDIN_LOSSES": str(losses)})
    return [line.split() for line in losses.read_text().splitlines()], proc


def test_resume_from_a_step_file_gives_the_uninterrupted_losses(tmp_path):
    """WeNet resumes with ``--checkpoint model_dir/step_N.pt``; with step_N.optim beside it the
    masters, Adam's moments and the step are restored too, and every later loss is the uninterrupted
    run's, bit for bit. Without it (WeNet's weights-only resume) the second loss already differs."""
    section = {"consolidate": {"enabled": True}}
    write_configs(tmp_path, stage=2, section=section, save_interval=3)
    straight = tmp_path / "straight.txt"
    train(tmp_path, "model+optimizer", env={"STANDIN_STEPS": "6", "STANDIN_LOSSES": str(straight)})
    exp = tmp_path / "exp"
    assert_state_dicts_equal(load(exp / "step_2.pt"), deepspeed_reference(exp, "step_2", build_model()))
    expected = [line.split() for line in straight.read_text().splitlines()][3:]
    resumed, proc = resume_from_step_2(tmp_path, "exact")
    print(f"steps 3-5: uninterrupted {expected}, resumed {resumed}")
    assert resumed == expected  # repr of each float: every bit
    assert proc.stderr.count(f"wenet_hooks: resumed exactly from {tmp_path / 'exact' / 'step_2.pt'} + "
                             "step_2.optim: fp32 masters and optimizer state (exp_avg, exp_avg_sq) of 16 "
                             "parameters at optimizer step 3, saved by ZeRO-2 on 2 ranks, restored onto ZeRO-2 on "
                             "2 ranks") == 1
    weights_only, proc = resume_from_step_2(tmp_path, "weights_only", keep_optimizer=False)
    assert weights_only[0] == expected[0] and weights_only[1] != expected[1]
    assert "step_2.optim beside it (on every rank): weights-only resume, the optimizer starts afresh" in proc.stderr


def test_resume_on_another_number_of_ranks_trains_to_the_end(tmp_path):
    write_configs(tmp_path, stage=2, section={"consolidate": {"enabled": True}}, save_interval=3)
    train(tmp_path, "model+optimizer", env={"STANDIN_STEPS": "3"})
    resumed, proc = resume_from_step_2(tmp_path, "three", nproc=3)
    assert [step for step, _ in resumed] == ["3", "4", "5"]
    assert "saved by ZeRO-2 on 2 ranks, restored onto ZeRO-2 on 3 ranks" in proc.stderr
    assert_recognize_ready(tmp_path / "three_exp" / "step_5.pt")


def test_files_only_killed_mid_write_resumes_exactly_from_the_save_before(tmp_path):
    """``sharded: false``: no sharded folder is written; <tag>.pt and <tag>.optim are the checkpoint,
    gathered and written in the background. Rank 0 killed while writing step_4.pt loses that save
    only: step_3 is complete and verified, and resuming from it gives the uninterrupted losses (its
    optimizer file renamed as wenet_hooks 0.2.0 named it, which a resume still reads)."""
    section = {"consolidate": {"enabled": True, "sharded": False}}
    write_configs(tmp_path, stage=2, section=section, save_interval=1)
    straight = tmp_path / "straight.txt"
    train(tmp_path, "model+optimizer", "--model_dir", str(tmp_path / "straight_exp"),
          env={"STANDIN_STEPS": "6", "STANDIN_LOSSES": str(straight)})
    done = tmp_path / "straight_exp"
    assert not [p.name for p in done.iterdir() if p.is_dir()] and not (done / "latest").exists()
    for tag in ("init", "step_1", "step_2", "step_3", "step_4", "step_5", "epoch_0"):
        assert_recognize_ready(done / f"{tag}.pt")
        assert (done / f"{tag}.optim").is_file() and (done / f"{tag}.yaml").is_file()
    killed = train(tmp_path, "model+optimizer", check=False,
                   env=instrumented(STANDIN_STEPS="6", WENET_HOOKS_TEST_KILL_WRITING="step_4"))
    assert killed.returncode != 0
    exp = tmp_path / "exp"
    assert not (exp / "step_4.pt").exists() and not (exp / "step_4.optim").exists()
    assert not [p.name for p in exp.iterdir() if p.is_dir()]  # nothing sharded, ever
    assert_recognize_ready(exp / "step_3.pt")
    assert_state_dicts_equal(load(exp / "step_3.pt"), load(done / "step_3.pt"))
    # The optimizer file under wenet_hooks 0.2.0's name (<tag>.optim.pt) is still read, and it says so.
    (exp / "step_3.optim").rename(exp / "step_3.optim.pt")
    resumed = tmp_path / "resumed.txt"
    proc = train(tmp_path, "model+optimizer", "--checkpoint", str(exp / "step_3.pt"), "--model_dir",
                 str(tmp_path / "resumed_exp"), env={"STANDIN_STEPS": "2", "STANDIN_LOSSES": str(resumed)})
    expected = [line.split() for line in straight.read_text().splitlines()][4:]  # steps 4 and 5
    assert [line.split() for line in resumed.read_text().splitlines()] == expected  # every bit
    assert proc.stderr.count(f"wenet_hooks: reading {exp / 'step_3.optim.pt'}, the name wenet_hooks 0.2.0 gave the "
                             "optimizer file; new saves write step_3.optim") == 2  # once per rank
    assert f"wenet_hooks: resumed exactly from {exp / 'step_3.pt'} + step_3.optim.pt: " in proc.stderr



def yaml_of(path):
    return yaml.load(path.read_text(), Loader=yaml.FullLoader)


def test_files_only_steps_mode_trains_to_the_end_each_yaml_its_own_and_the_last_step_save_kept(tmp_path):
    """``sharded: false`` in steps mode: WeNet's executor rewrites its info_dict at the next batch (tag
    TRAIN, step, a tensor loss) while the save is written in the background: each yaml holds its own save.
    With ``tags`` leaving out ``epoch``, WeNet's own save of the last epoch settles the step save in flight
    (its copies delayed 3 s here) before WeNet destroys the process groups."""
    section = {"consolidate": {"enabled": True, "sharded": False, "tags": ["init", "step"]}}
    write_configs(tmp_path, stage=3, section=section, save_interval=2)
    train(tmp_path, "model+optimizer", env=instrumented(STANDIN_STEPS="6", WENET_HOOKS_TEST_SLOW_COPIES="3"))
    exp = tmp_path / "exp"
    for step in (1, 3, 5):
        info = yaml_of(exp / f"step_{step}.yaml")
        assert (info["tag"], info["step"], info["batch_idx"]) == (f"step_{step}", step, step)
        assert isinstance(info["loss_dict"]["loss"], float)  # the CV loss of the save, not the next batch's
        assert committed(exp / f"step_{step}.pt") is None
        assert_recognize_ready(exp / f"step_{step}.pt")
    assert (exp / "latest_save").read_text() == "step_5\n"
    assert (exp / "epoch_0").is_dir() and not (exp / "epoch_0.pt").exists()  # WeNet's own save of epoch_0
    assert not list(exp.glob("*.tmp"))


# Each kill, then the identical command: (what kills rank 0, the environment that does it).
KILLS = [
    ("during training (the 3rd step: epoch 1)", {"WENET_HOOKS_TEST_DIE_AT_STEP": "3"}),
    ("while epoch_1.pt is written in the background", {"WENET_HOOKS_TEST_KILL_WRITING": "epoch_1"}),
    ("after epoch_1.pt was renamed, before epoch_1.optim", {"WENET_HOOKS_TEST_KILL_AT": "epoch_1.optim"}),
    ("before the last save's record epoch_2.yaml is renamed", {"WENET_HOOKS_TEST_KILL_AT": "epoch_2.yaml"}),
]


def test_killed_anywhere_the_same_command_resumes_and_ends_bit_identical(tmp_path):
    """``sharded: false`` + ``resume: auto`` in epoch mode: rank 0 is killed (SIGKILL) at each moment of
    KILLS in turn, the same command rerun after each; the run ends with epoch_2.pt and epoch_2.optim
    bit-identical to an uninterrupted run's, and no uncommitted save was ever resumed from.

    torch's AdamW (``torch_adam``), as on a GPU's FusedAdam, derives Adam's bias corrections from the
    step; DeepSpeed's CPU Adam multiplies its beta powers up step by step in C++ state that a new
    process recomputes with ``pow`` (``cpu_adam.h``), so no resume of it, DeepSpeed's own included, is
    exact to the last bit on a CPU."""
    section = {"consolidate": {"enabled": True, "sharded": False, "resume": "auto"}}
    write_configs(tmp_path, stage=2, section=section, max_epoch=3)
    config = json.loads((tmp_path / "ds.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "ds.json").write_text(json.dumps(config))
    straight = tmp_path / "straight"
    train(tmp_path, "model+optimizer", "--model_dir", str(straight))
    exp = tmp_path / "exp"
    for moment, env in KILLS:
        killed = train(tmp_path, "model+optimizer", check=False, env=instrumented(**env))
        assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, (moment, killed.stderr[-3000:])
        newest = newest_committed(exp)
        print(f"killed {moment}: left {listing(exp)}; newest committed: {newest and newest.name}")
    done = train(tmp_path, "model+optimizer")
    assert f"wenet_hooks: resume: auto: continuing from {exp / 'epoch_1.pt'}, the newest committed save in " \
           f"{exp}" in done.stderr
    for name in ("epoch_2.pt", "epoch_2.optim"):
        assert (exp / name).read_bytes() == (straight / name).read_bytes(), name
    assert committed(exp / "epoch_2.pt") is None and (exp / "latest_save").read_text() == "epoch_2\n"
    assert not list(exp.glob("*.tmp"))
