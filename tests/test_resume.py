"""Exact resume from ``<tag>.pt`` + ``<tag>.optim``, at any world size and ZeRO stage.

Real DeepSpeed on CPU ranks (gloo), three launches (tests/jobs/resume_job.py):
3 ranks write ZeRO-2 and ZeRO-3 files; 2 ranks resume exactly (every case
below), restore the 3-rank files into ZeRO-2 and ZeRO-3, write their own and
refuse bad ones; 3 ranks restore the 2-rank files.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import FIXTURES, JOBS, run_torchrun
from helpers import assert_state_dicts_equal, deepspeed_optimizer_reference, deepspeed_reference
from support.tiny_model import build_model
from test_convert_cli import convert

pytestmark = [pytest.mark.multirank, pytest.mark.usefixtures("deepspeed_trains")]

# Frozen weights and a tied embedding are in the tiny model; WarmupLR is in every case.
EXACT = ["z1-fp32-nooffload", "z1-bf16-offload", "z2-fp32-nooffload", "z2-bf16-nooffload", "z2-fp32-offload",
         "z3-fp32-nooffload", "z3-bf16-nooffload", "z3-fp32-offload"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    x3, x2 = root / "x3", root / "x2"
    run_torchrun(JOBS / "resume_job.py", str(root / "a"), f"write={x3}", nproc=3)
    run_torchrun(JOBS / "resume_job.py", str(root / "b"), f"exact={'+'.join(EXACT)}", f"restore={x3}",
                 f"write={x2}", f"refuse={x2 / 'zero2'}", "fresh=z2-bf16-nooffload", "zero0=", "reload=", "votes=", nproc=2)
    run_torchrun(JOBS / "resume_job.py", str(root / "c"), f"restore={x2}", nproc=3)
    seen = {name: [json.loads((root / name / f"rank{r}.json").read_text()) for r in range(ranks)]
            for name, ranks in (("b", 2), ("c", 3))}
    return root, seen


def load(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("case", EXACT)
def test_resumed_run_logs_the_uninterrupted_losses_bit_for_bit(jobs, case):
    _, seen = jobs
    result = seen["b"][0]["exact"][case]
    assert "error" not in result, result.get("error")
    if result["resumed"] != result["straight"]:
        # The bar is then DeepSpeed's own load_checkpoint resume of the same save; its error fails here too.
        bar = result["deepspeed_resumed"]
        assert isinstance(bar, list), f"DeepSpeed's own resume failed: {bar}"
        assert result["resumed"] == bar, (result["straight"], bar)  # floats from JSON: every bit
    # Gathered in the background while steps 4-6 ran: from the copy taken at the save. A gather
    # prepared at the save and finished only after step 4 still holds the file's state exactly.
    assert result["snapshot"] is True
    # The save's copies were taken by its background job, late (slowed down on purpose): the next step
    # waited for them, and only that made the file hold the state of the save's step (asserted above).
    assert result["step_held_s"] > 0.25, result["step_held_s"]
    assert result["lr"][0] == result["lr"][1]
    # Without the optimizer file (WeNet's weights-only resume) the path changes at the second step.
    assert result["weights_only"][0] == result["straight"][0]
    assert result["weights_only"][1] != result["straight"][1]
    assert result["restored"].startswith("fp32 masters and optimizer state (exp_avg, exp_avg_sq) of 16 parameters "
                                         "at optimizer step 3, saved by ZeRO-")


@pytest.mark.parametrize("job,written_by", [("b", "x3"), ("c", "x2")], ids=["3->2 ranks", "2->3 ranks"])
@pytest.mark.parametrize("saved,stage", [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_restored_state_gathered_again_equals_the_files(jobs, job, written_by, saved, stage, tmp_path):
    root, seen = jobs
    source = root / written_by / f"zero{saved}"
    again = root / job
    assert_state_dicts_equal(load(again / f"again-{saved}-{stage}.pt"), load(source / "step_3.pt"))
    optim_again, optim_source = load(again / f"again-{saved}-{stage}.optim"), load(source / "step_3.optim")
    meta_again, meta_source = (json.loads(bytes(d.pop("meta").numpy())) for d in (optim_again, optim_source))
    assert_state_dicts_equal(optim_again, optim_source)  # every exp_avg / exp_avg_sq, tensor for tensor
    for field in ("step", "param_groups", "lr_scheduler", "engine", "state_keys", "params"):
        assert meta_again[field] == meta_source[field], field
    # An oracle that shares no code with the restore: DeepSpeed's zero_to_fp32 of its own save of the
    # restored engine, for the masters and for each of Adam's moments.
    ds = again / f"ds-{saved}-{stage}"
    reference = deepspeed_reference(ds, "step_3", build_model())
    source_weights = load(source / "step_3.pt")
    trainable = list(meta_source["params"])
    assert_state_dicts_equal({k: reference[k] for k in trainable}, {k: source_weights[k] for k in trainable})
    for key in meta_source["state_keys"]:
        moments = deepspeed_optimizer_reference(ds, "step_3", key, tmp_path / key)
        assert_state_dicts_equal({k: moments[k] for k in trainable},
                                 {k: optim_source[f"{key}/{k}"] for k in trainable})
    ranks = {"x3": 3, "x2": 2}[written_by]
    result = seen[job][0]["restore"][f"{saved}->{stage}"]
    assert result["restored"].endswith(f"saved by ZeRO-{saved} on {ranks} ranks, restored onto ZeRO-{stage} on "
                                       f"{5 - ranks} ranks")
    assert torch.isfinite(torch.tensor(result["loss"]))  # and training goes on


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("written_by", ["x3", "x2"], ids=["3 ranks", "2 ranks"])
def test_files_written_equal_deepspeeds_own_reconstruction(jobs, written_by, stage, tmp_path):
    """The weights and each of Adam's moments, against DeepSpeed's zero_to_fp32 of its own save of the same step."""
    root, _ = jobs
    folder = root / written_by / f"zero{stage}"
    meta, state = optimizer_file(folder / "step_3.optim")
    weights = load(folder / "step_3.pt")
    reference = deepspeed_reference(folder, "step_3", build_model())
    trainable = list(meta["params"])
    assert_state_dicts_equal({k: weights[k] for k in trainable}, {k: reference[k] for k in trainable})
    for key in meta["state_keys"]:
        moments = deepspeed_optimizer_reference(folder, "step_3", key, tmp_path / key)
        assert_state_dicts_equal({k: state[f"{key}/{k}"] for k in trainable}, {k: moments[k] for k in trainable})


def test_files_saved_before_the_first_step_resume_too(jobs):
    """WeNet's init save has no optimizer state yet: resuming from it is a fresh start, exactly."""
    _, seen = jobs
    result = seen["b"][0]["fresh"]
    assert result["resumed"] == result["straight"]
    assert result["restored"].startswith("fp32 masters and optimizer state (none yet) of 16 parameters at optimizer "
                                         "step 0")


def test_load_checkpoint_during_a_background_save_leaves_the_save_whole(jobs):
    """DeepSpeed's load_checkpoint writes the masters in place outside any step: called right after a
    background save whose copies are still to be taken, it first waits for them."""
    _, seen = jobs
    for stage in ("2", "3"):
        assert seen["b"][0]["reload"][stage] == {"B holds B": True, "B.optim holds B": True, "rolled back": True}


def test_a_background_save_makes_two_collectives_on_the_training_thread(jobs):
    """One exchange of the save's plan (the layout unchanged? and the optimizer state's keys) and one vote
    on its preparation (7 before: the layout, each gather's allocation, the optimizer's keys, each phase);
    an engine's first save also agrees on every rank's fragments (and the process's first makes the
    background group)."""
    _, seen = jobs
    for rank in (0, 1):
        counted = seen["b"][rank]["votes"]
        for stage in ("z2", "z3"):
            assert [c for c in counted[f"{stage} first"] if c != "new_group"] == ["all_gather_object"] * 3, counted
            assert counted[f"{stage} second"] == counted[f"{stage} third"] == ["all_gather_object"] * 2, counted


def test_zero0_saves_weights_without_an_optimizer_file(jobs):
    """No partitioned optimizer state to gather: the save goes on without one, and an older save's
    optimizer file of the same tag is removed so it can never be paired with these weights."""
    _, seen = jobs
    assert seen["b"][0]["zero0"]["files"] == ["step_3.pt"]


def test_bad_optimizer_files_are_refused_before_anything_changes(jobs):
    root, seen = jobs
    folder = root / "x2" / "zero2"
    refused = seen["b"][0]["refuse"]
    assert refused == seen["b"][1]["refuse"] | {"unchanged": True, "crafted ran": False}  # every rank alike
    assert refused["unchanged"] is True and refused["crafted ran"] is False
    head = "cannot resume from {} ({} problem(s)); nothing was restored:\n  - "
    assert refused["bad-another-model.optim"] == head.format(folder / "bad-another-model.optim", 2) + (
        "'exp_avg/encoder.encoders.0.linear.weight': shape [3, 3], expected [32, 32]\n"
        "  - unexpected state of 'encoder.extra.weight': not a trainable parameter of this model")
    assert re.fullmatch(re.escape(head.format(folder / "bad-sgd.optim", 1)) + r"holds SGD state, but this "
                        r"run's optimizer is \w*Adam\w*; HINT: resume with the optimizer the checkpoint was trained "
                        r"with, or without the \.optim file", refused["bad-sgd.optim"])
    path = folder / "bad-truncated.optim"
    assert refused["bad-truncated.optim"].startswith(head.format(path, 1) + f"{path}: cannot be loaded with ")
    assert refused["bad-truncated.optim"].endswith("; HINT: the file is truncated or corrupt")
    path = folder / "bad-incomplete.optim"
    assert refused["bad-incomplete.optim"] == head.format(path, 1) + (
        f"{path}: its 'meta' lacks step, param_groups: not a complete optimizer file")
    assert re.fullmatch(re.escape(head.format(folder / "step_3.optim", 1)) + r"weights: '[\w.]+' is "
                        r"torch.bfloat16, not the fp32 masters; HINT: exact resume needs a <tag>.pt saved with "
                        r"dtype: fp32 \(this one is bf16-weights.pt\)", refused["bf16-weights.pt"])
    fingerprints = re.escape(head.format(folder / "step_3.optim", 1)) + (
        r"step_3\.optim belongs to another save than other-save\.pt \(it was saved beside weights with fingerprint "
        r"[0-9a-f]{8}; " + re.escape(str(folder / "other-save.pt")) + r" has [0-9a-f]{8}\): a save of the same tag "
        r"was cut off between its files; HINT: resume from a committed save \(resume: auto finds the newest\)")
    assert re.fullmatch(fingerprints, refused["other-save.pt"]), refused["other-save.pt"]
    path = folder / "bad-nostate.optim"
    assert refused["bad-nostate.optim"] == head.format(path, 1) + (
        "holds no optimizer state although it was saved at optimizer step 3: the state was kept where it was not "
        "read; HINT: resume without the optimizer file (weights only)")
    path = folder / "bad-crafted.optim"
    assert re.fullmatch(re.escape(head.format(path, 1) + f"{path}: holds objects that are not plain tensors and "
                                  "data (") + r".*GLOBAL.*\); refused, nothing in it was run",
                        refused["bad-crafted.optim"])


def optimizer_file(path):
    loaded = load(path)
    return json.loads(bytes(loaded.pop("meta").numpy())), loaded


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("written_by", ["x3", "x2"])
def test_offline_optimizer_file_equals_the_in_training_one(jobs, tmp_path, written_by, stage):
    """wenet-hooks-convert optimizer=true on DeepSpeed's sharded save of the same step."""
    root, _ = jobs
    source = root / written_by / f"zero{stage}"
    shutil.copytree(source / "step_3", tmp_path / "step_3")
    convert(f"model_dir={tmp_path}", "tag=step_3", "optimizer=true")
    offline_meta, offline = optimizer_file(tmp_path / "step_3.optim")
    meta, in_training = optimizer_file(source / "step_3.optim")
    assert list(offline) == list(in_training)
    assert_state_dicts_equal(offline, in_training)
    for key in meta["state_keys"]:  # and both against DeepSpeed's own reassembly of the same shards
        moments = deepspeed_optimizer_reference(source, "step_3", key, tmp_path / "reference" / key)
        assert_state_dicts_equal({p: offline[f"{key}/{p}"] for p in meta["params"]},
                                 {p: moments[p] for p in meta["params"]})
    # DeepSpeed's shards do not name the optimizer class; everything else is the same.
    assert offline_meta.pop("optimizer") == "Adam" and meta.pop("optimizer").endswith("Adam")
    assert offline_meta == meta


def test_offline_optimizer_files_of_real_wenet_checkpoints(tmp_path):
    for name in ("t_z1_model_optimizer", "t_z2_model_optimizer", "t_z3_model_optimizer", "t_z1_lora"):
        exp = tmp_path / name
        shutil.copytree(FIXTURES / name / "epoch_0", exp / "epoch_0")
        convert(f"model_dir={exp}", "tag=epoch_0", "optimizer=true")
        meta, state = optimizer_file(exp / "epoch_0.optim")
        weights = load(exp / "epoch_0.pt")
        assert (meta["optimizer"], meta["state_keys"], meta["world_size"]) == ("Adam", ["exp_avg", "exp_avg_sq"], 2)
        assert meta["zero_stage"] == int(name[3]) and meta["step"] > 0 and meta["lr_scheduler"]["last_epoch"] >= 1
        assert {key.split("/", 1)[1] for key in state} == set(meta["params"]) <= set(weights)
        assert all(state[f"{k}/{p}"].shape == weights[p].shape for p in meta["params"] for k in meta["state_keys"])
    # LoRA (only_optimize_lora): the 16 LoRA matrices and 8 attention biases are trained, so only they
    # have optimizer state; the 91 frozen weights have none.
    assert (len(meta["params"]), sum("lora" in p for p in meta["params"]), len(weights)) == (24, 16, 117)


def test_offline_optimizer_file_needs_a_sharded_save(tmp_path):
    shutil.copytree(FIXTURES / "t_z2_model_only", tmp_path / "exp")
    proc = convert(f"model_dir={tmp_path / 'exp'}", "tag=epoch_0", "optimizer=true", check=False)
    assert proc.returncode == 2
    assert (f"{tmp_path / 'exp' / 'epoch_0.pt'} holds weights only: an optimizer file needs DeepSpeed's sharded "
            "epoch_0/ of a model+optimizer save; HINT: convert it without optimizer=true") in proc.stderr
