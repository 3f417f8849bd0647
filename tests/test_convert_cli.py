"""The installed ``wenet-hooks-convert`` command, run as a user runs it (a subprocess).

Inputs: the real WeNet checkpoints of ../shared/fixtures/wenet, the checkpoints
of the session's DeepSpeed job (conftest.matrix), and folder-shaped outputs
made by DeepSpeed's own converter with a small max_shard_size.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import subprocess

import pytest
import torch

from conftest import CONVERT, FIXTURES, case_dir
from helpers import assert_state_dicts_equal, small_disk
from support.deepspeed_versions import zero_to_fp32
from wenet_hooks import Manifest, verify




def convert(*overrides, check=True):
    proc = subprocess.run([CONVERT, *overrides], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def load(path):
    return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)


def snapshot(folder):
    """Every file under ``folder`` with its bytes, to show a failed run changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def reference(model_dir, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(model_dir), tag=tag)


@pytest.fixture(scope="module")
def wenet_dir(tmp_path_factory):
    """The WeNet fixtures as one model_dir, one tag per fixture."""
    model_dir = tmp_path_factory.mktemp("exp")
    for name in ("t_z1_model_optimizer", "t_z2_model_optimizer", "t_z3_model_optimizer", "t_z1_lora"):
        shutil.copytree(FIXTURES / name / "epoch_0", model_dir / name)
    shutil.copytree(FIXTURES / "t_z2_model_only" / "epoch_0.pt", model_dir / "t_z2_model_only.pt")
    return model_dir


def test_real_wenet_checkpoints_every_tag(wenet_dir):
    proc = convert(f"model_dir={wenet_dir}")
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["tag", "source", "zero", "world", "tensors", "MB", "dtype", "seconds", "verified"]
    assert [line.split()[:5] + line.split()[-1:] for line in lines[2:7]] == [
        ["t_z1_lora", "sharded", "1", "2", "117", "yes"],
        ["t_z1_model_optimizer", "sharded", "1", "2", "101", "yes"],
        ["t_z2_model_only", "folder", "-", "-", "101", "yes"],
        ["t_z2_model_optimizer", "sharded", "2", "2", "101", "yes"],
        ["t_z3_model_optimizer", "sharded", "3", "2", "101", "yes"],
    ]
    assert lines[-1] == "5 converted, 0 failed"
    for name in ("t_z1_model_optimizer", "t_z2_model_optimizer", "t_z3_model_optimizer", "t_z1_lora"):
        verify(wenet_dir / f"{name}.pt", Manifest.from_json_file(FIXTURES / name / "expected_keys.json"))
        ours = load(wenet_dir / f"{name}.pt")
        ds = reference(wenet_dir, name)
        assert_state_dicts_equal({k: ours[k] for k in ds}, ds)
    # LoRA under ZeRO-1: DeepSpeed's converter keeps 26 of 117 tensors; the 91 frozen ones come from the module.
    assert len(reference(wenet_dir, "t_z1_lora")) == 26
    # The folder that WeNet's model_only path left is now one file with the same tensors.
    repaired = load(wenet_dir / "t_z2_model_only.pt")
    assert_state_dicts_equal(repaired, load(FIXTURES / "t_z2_model_only" / "epoch_0.pt" / "pytorch_model.bin"))
    assert not any(p.name.endswith(".being-replaced") for p in wenet_dir.iterdir())
    # A second run finds nothing left to do, and says so with status 0.
    again = convert(f"model_dir={wenet_dir}")
    assert again.stdout.splitlines()[-2:] == [
        "nothing to convert: every tag already has a valid single-file .pt", "0 converted, 0 failed"]


def test_deepspeed_job_checkpoints_equal_the_in_training_files(matrix, tmp_path):
    """Offline from the sharded step_3/ == what consolidate() wrote during training, bit for bit."""
    cases = ["z1-fp32-nooffload", "z1-bf16-nooffload", "z2-fp32-nooffload", "z2-bf16-offload",
             "z3-fp32-nooffload", "z3-bf16-nooffload"]
    for case in cases:
        shutil.copytree(case_dir(matrix, case) / "step_3", tmp_path / case)
    convert(f"model_dir={tmp_path}", "keep_sharded=false")
    for case in cases:
        assert_state_dicts_equal(load(tmp_path / f"{case}.pt"), load(case_dir(matrix, case) / "step_3.pt"))
        assert not (tmp_path / case).exists()  # keep_sharded=false, after verification


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_sharded_folder_outputs_of_zero_to_fp32(matrix, tmp_path, safe):
    """DeepSpeed's converter with a tiny max_shard_size, so it really shards.

    safetensors refuses tied tensors (the demo model ties its embedding), so
    that case converts the real WeNet Transformer of the fixtures instead.
    """
    if safe:
        source, tag = FIXTURES / "t_z2_model_optimizer", "epoch_0"
    else:
        source, tag = case_dir(matrix, "z2-fp32-nooffload"), "step_3"
    zero_to_fp32(source, tmp_path / f"{tag}.pt", tag, max_shard_size="256KB" if safe else "8KB",
                 safe_serialization=safe)
    files = sorted(p.name for p in (tmp_path / f"{tag}.pt").iterdir())
    assert len(files) >= 3 and files[-1].endswith(".index.json")  # really sharded: 2 or more files and the index
    convert(f"model_dir={tmp_path}", f"tag={tag}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{tag}.pt"]
    ours = load(tmp_path / f"{tag}.pt")
    assert_state_dicts_equal(dict(sorted(ours.items())), dict(sorted(reference(source, tag).items())))
    if not safe:
        tied = ours["decoder.embed.0.weight"], ours["decoder.output_layer.weight"]
        assert tied[0].untyped_storage().data_ptr() == tied[1].untyped_storage().data_ptr()


def test_dry_run_writes_nothing(tmp_path):
    shutil.copytree(FIXTURES / "t_z3_model_optimizer", tmp_path / "exp")
    before = snapshot(tmp_path / "exp")
    proc = convert(f"model_dir={tmp_path / 'exp'}", "dry_run=true")
    assert proc.stdout.splitlines()[-1] == "dry run: 1 tag(s) would be converted; nothing was written"
    assert snapshot(tmp_path / "exp") == before


# --- plain key=value command lines are read without Hydra, into the same config ----------------------

PLAIN = [  # what users type: read without Hydra
    ["model_dir=exp/whisper"],
    ["model_dir=/data/exp/whisper", "tag=epoch_7"],
    ["model_dir=exp", "tag=latest", "dry_run=true"],
    ["model_dir=exp", "dtype=bf16", "keep_sharded=none", "overwrite=True"],
    ["model_dir=exp", "tag=null", "optimizer=false", "config=exp/train.yaml"],
    ["model_dir=exp_1/sub-dir/v1.2", "tag=step_1000", "dry_run=FALSE"],
]
NOT_PLAIN = [  # Hydra's grammar gives these a meaning of its own, or reports them: Hydra reads them
    ["model_dir=./exp"], ["model_dir=exp", "tag=7"], ["model_dir=exp", "tag=1e3"], ["model_dir=exp", "tag=true"],
    ["model_dir=exp", "tag=NaN"], ["model_dir=exp", "keep_sharded=false"], ["model_dir=exp", "tag='a b'"],
    ["model_dir=exp", "tag=${oc.env:HOME}"], ["model_dir=exp", "+extra=1"], ["model_dir=exp", "tag=a,b"],
    ["model_dir=exp", "dtype=fp64"], ["model_dir=exp", "dryrun=true"], ["tag=epoch_1"], ["model_dir=null"],
    ["model_dir=exp", "tag=a", "tag=b"], ["--cfg", "job"], ["model_dir=exp", "hydra.verbose=true"],
    ["model_dir=exp", "dry_run=yes"], ["model_dir=exp", "dtype=Dtype.bf16"],
]


def hydra_reading(argv):
    """The config Hydra composes for ``argv`` (as the command does), or the error it reports (which equals
    no config)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from wenet_hooks.convert.options import register_schema

    register_schema()
    try:
        with initialize_config_module("wenet_hooks.conf", version_base="1.3"):
            return OmegaConf.to_object(compose("convert", overrides=list(argv)))
    except Exception as e:  # noqa: BLE001 - Hydra refusing a line is its reading of it
        return e


def test_plain_command_lines_are_read_as_hydra_reads_them():
    from wenet_hooks.convert.plain_args import plain_config

    for argv in PLAIN:
        assert plain_config(argv) == hydra_reading(argv), argv
    for argv in NOT_PLAIN:
        assert plain_config(argv) is None, argv


def test_a_plain_command_line_imports_neither_hydra_nor_deepspeed(tmp_path):
    shutil.copytree(FIXTURES / "t_z2_model_optimizer", tmp_path / "exp")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    outputs = {}
    for how, tag in (("plain", "tag=epoch_0"), ("hydra", "tag='epoch_0'")):
        proc = subprocess.run([CONVERT, f"model_dir={tmp_path / 'exp'}", tag, "dry_run=true"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert ("hydra" in imported) == (how == "hydra"), how
        assert "deepspeed" not in imported
        outputs[how] = proc.stdout
    assert outputs["plain"] == outputs["hydra"]
    assert outputs["plain"].splitlines()[-1] == "dry run: 1 tag(s) would be converted; nothing was written"


# --- bad input: exit status 2, the whole message, nothing changed ------------------------------------


def bad_input(tmp_path, fixture, spoil):
    exp = tmp_path / "exp"
    shutil.copytree(FIXTURES / fixture, exp)
    spoil(exp)
    return exp


def assert_refused(exp, message, *overrides):
    before = snapshot(exp)
    proc = convert(f"model_dir={exp}", *overrides, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr
    assert snapshot(exp) == before


def test_missing_rank_shard(tmp_path):
    exp = bad_input(tmp_path, "t_z2_model_optimizer",
                    lambda e: (e / "epoch_0" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink())
    assert_refused(exp, f"{exp / 'epoch_0'}: zero_pp_rank_1_mp_rank_00_optim_states.pt, the optim shard of "
                   "rank 1, is missing (1 of 2 ranks found); HINT: copy it back from the node that wrote it")


def test_shard_of_another_world_size(tmp_path):
    def spoil(e):
        shutil.copy(e / "epoch_0" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                    e / "epoch_0" / "zero_pp_rank_2_mp_rank_00_optim_states.pt")

    exp = bad_input(tmp_path, "t_z3_model_optimizer", spoil)
    assert_refused(exp, f"{exp / 'epoch_0' / 'zero_pp_rank_2_mp_rank_00_optim_states.pt'}: belongs to no rank of "
                   "this 2-rank save: shards from two different runs are mixed in this folder", "tag=epoch_0")


def test_shards_of_two_different_steps(matrix, tmp_path):
    source = case_dir(matrix, "z2-fp32-nooffload")
    shutil.copytree(source / "step_3", tmp_path / "exp" / "step_3")
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(source / "step_4" / name, tmp_path / "exp" / "step_3" / name)
    exp = tmp_path / "exp"
    assert_refused(exp, f"{exp / 'step_3' / name}: was saved at optimizer step (4.0,) but "
                   "zero_pp_rank_0_mp_rank_00_optim_states.pt at step (3.0,): shards from two different saves "
                   "are mixed in this folder")


def test_truncated_shard(tmp_path):
    def spoil(e):
        path = e / "epoch_0" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    exp = bad_input(tmp_path, "t_z1_model_optimizer", spoil)
    assert_refused(exp, f"{exp / 'epoch_0' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}: cannot be read (")
    assert_refused(exp, "HINT: the file is truncated or corrupt: restore it, or convert another tag")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_shard_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    exp = bad_input(tmp_path, "t_z2_model_optimizer", lambda e: torch.save(
        {"optimizer_state_dict": _RunsCode(str(marker))},
        e / "epoch_0" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", pickle_module=pickle))
    assert_refused(exp, "zero_pp_rank_1_mp_rank_00_optim_states.pt: holds objects that are not plain tensors and "
                   "data, refused by weights_only loading (")
    assert not marker.exists()


def test_not_a_deepspeed_checkpoint_and_unknown_tag(tmp_path):
    exp = tmp_path / "exp"
    (exp / "epoch_0").mkdir(parents=True)
    (exp / "epoch_0" / "notes.txt").write_text("hello")
    assert_refused(exp, f"{exp} holds no DeepSpeed checkpoint (<tag>/ with *model_states.pt) and no "
                   "folder-shaped <tag>.pt/; HINT: is this the right model_dir?")
    exp2 = bad_input(tmp_path / "b", "t_z2_model_optimizer", lambda e: None)
    assert_refused(exp2, f"{exp2} has no checkpoint for tag 'epoch_9' (neither epoch_9/ nor a folder "
                   "epoch_9.pt/); HINT: tags found: epoch_0", "tag=epoch_9")


def test_latest_naming_a_missing_tag(tmp_path):
    exp = bad_input(tmp_path, "t_z2_model_optimizer", lambda e: (e / "latest").write_text("epoch_7"))
    assert_refused(exp, f"{exp / 'latest'}: names tag 'epoch_7', which has no checkpoint in {exp}; HINT: pass "
                   "one of: epoch_0", "tag=latest")


def test_index_naming_a_missing_file(matrix, tmp_path):
    exp = tmp_path / "exp"
    zero_to_fp32(case_dir(matrix, "z3-fp32-nooffload"), exp / "step_3.pt", "step_3", max_shard_size="8KB")
    shard = sorted((exp / "step_3.pt").glob("pytorch_model-*.bin"))[1]
    shard.unlink()
    assert_refused(exp, f"{exp / 'step_3.pt' / 'pytorch_model.bin.index.json'}: names {shard.name}, which is "
                   f"missing from {exp / 'step_3.pt'}; HINT: restore that file, or convert from the sharded "
                   "checkpoint instead", "tag=step_3")


def test_existing_output_needs_overwrite(tmp_path):
    exp = bad_input(tmp_path, "t_z2_model_optimizer", lambda e: None)
    convert(f"model_dir={exp}", "tag=epoch_0")
    assert_refused(exp, f"{exp / 'epoch_0.pt'} already exists and loads as a single file; HINT: pass "
                   "overwrite=true to replace it", "tag=epoch_0")
    first = (exp / "epoch_0.pt").read_bytes()
    convert(f"model_dir={exp}", "tag=epoch_0", "overwrite=true", "dtype=bf16")
    assert load(exp / "epoch_0.pt")["encoder.after_norm.weight"].dtype == torch.bfloat16
    assert first != (exp / "epoch_0.pt").read_bytes()


def test_interrupted_repair_is_finished_by_the_next_run(tmp_path):
    """A crash after the folder was moved aside: the next run finds it and completes the repair."""
    exp = tmp_path / "exp"
    shutil.copytree(FIXTURES / "t_z2_model_only", exp)
    (exp / "epoch_0.pt").rename(exp / "epoch_0.pt.being-replaced")
    (exp / "epoch_0.pt.tmp").write_bytes(b"half a file")
    convert(f"model_dir={exp}")
    assert sorted(p.name for p in exp.iterdir() if p.name.startswith("epoch_0.pt")) == ["epoch_0.pt"]
    assert_state_dicts_equal(load(exp / "epoch_0.pt"),
                             load(FIXTURES / "t_z2_model_only" / "epoch_0.pt" / "pytorch_model.bin"))


def folder_size(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_full_disk_says_how_much_and_leaves_nothing_half_written(tmp_path):
    source = FIXTURES / "t_z3_model_optimizer"
    with small_disk(tmp_path, folder_size(source) + 512 * 1024) as disk:
        exp = disk / "exp"
        shutil.copytree(source, exp)
        assert_refused(exp, f"could not write {exp / 'epoch_0.pt'}: no space left on the device of {exp}: about "
                       "3.7 MB needed, ", "tag=epoch_0")
        assert_refused(exp, "B free; HINT: free space or point model_dir elsewhere", "tag=epoch_0")


def test_read_only_folder(tmp_path):
    with small_disk(tmp_path, 64 * 2**20) as disk:
        exp = disk / "exp"
        shutil.copytree(FIXTURES / "t_z2_model_optimizer", exp)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert_refused(exp, f"could not write {exp / 'epoch_0.pt'}: {exp} is not writable (Read-only file "
                       "system); HINT: check its permissions or mount", "tag=epoch_0")


def test_repair_interrupted_after_publishing_is_cleaned_up(tmp_path):
    """A crash between publishing epoch_0.pt and removing the moved-aside folder."""
    exp = tmp_path / "exp"
    shutil.copytree(FIXTURES / "t_z2_model_only", exp)
    shutil.copytree(exp / "epoch_0.pt", exp / "epoch_0.pt.being-replaced")
    shutil.rmtree(exp / "epoch_0.pt")
    torch.save(load(FIXTURES / "t_z2_model_only" / "epoch_0.pt" / "pytorch_model.bin"), exp / "epoch_0.pt")
    proc = convert(f"model_dir={exp}")
    assert proc.stdout.splitlines()[-1] == "0 converted, 0 failed"
    assert sorted(p.name for p in exp.iterdir() if p.name.startswith("epoch_0")) == ["epoch_0.pt", "epoch_0.yaml"]


def test_a_file_of_another_kind_in_the_folder(tmp_path):
    exp = bad_input(tmp_path, "t_z2_model_optimizer", lambda e: torch.save(
        {"weights": torch.zeros(2)}, e / "epoch_0" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert_refused(exp, f"{exp / 'epoch_0' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}: is not a DeepSpeed "
                   "checkpoint shard (no 'optimizer_state_dict' in it); HINT: a file of another kind was put in "
                   "this folder", "tag=epoch_0")


def test_optimizer_files_under_the_old_name_are_renamed(tmp_path):
    """wenet_hooks 0.2.0 named the optimizer file <tag>.optim.pt, which WeNet's average_model.py averages into
    the model: the offline command renames the package's own (never a model that happens to match)."""
    exp = tmp_path / "exp"
    shutil.copytree(FIXTURES / "t_z2_model_optimizer", exp)
    convert(f"model_dir={exp}", "tag=epoch_0", "optimizer=true")
    written = (exp / "epoch_0.optim").read_bytes()
    (exp / "epoch_0.optim").rename(exp / "epoch_0.optim.pt")
    shutil.copy(exp / "epoch_0.pt", exp / "model.optim.pt")  # a model under such a name: not the package's
    dry = convert(f"model_dir={exp}", "dry_run=true")
    assert f"would rename {exp / 'epoch_0.optim.pt'} to epoch_0.optim" in dry.stdout
    assert (exp / "epoch_0.optim.pt").is_file()
    proc = convert(f"model_dir={exp}")
    assert f"renamed {exp / 'epoch_0.optim.pt'} to epoch_0.optim: WeNet's average_model.py takes every *.pt for a " \
           "model" in proc.stderr
    assert (exp / "epoch_0.optim").read_bytes() == written and not (exp / "epoch_0.optim.pt").exists()
    assert (exp / "model.optim.pt").is_file()
    assert sorted(p.name for p in exp.glob("[!init]*.pt")) == ["epoch_0.pt", "model.optim.pt"]
