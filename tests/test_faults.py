"""Failures during a save end the save on every rank together, in seconds, never in a hang.

Real 2-rank DeepSpeed jobs on the CPU (gloo); the failure is injected by the
job script (tests/jobs/fault_job.py), not mocked in the library.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import CONVERT, JOBS, run_torchrun
from helpers import assert_state_dicts_equal, deepspeed_reference
from support.tiny_model import build_model

pytestmark = [pytest.mark.multirank, pytest.mark.usefixtures("deepspeed_trains")]


GATHER = "save '{tag}' failed on rank {rank} while gathering the weights: rank {rank}: "
FULL = ("could not write {dir}/{file}: no space left on the device of {dir}: about 17.3 kB needed, "
        "<n> [kMG]B free; HINT: free space or point model_dir elsewhere")
# scenario -> the whole message both ranks must get; <n> and <crc> stand for figures that vary.
EXPECTED = {
    "gather@1": GATHER.format(tag="gather_at_1", rank=1)
    + "reading elements 256..384 of the fp32 partition failed: injected: cannot read partition",
    "gather@0": GATHER.format(tag="gather_at_0", rank=0)
    + "reading elements 256..384 of the fp32 partition failed: injected: cannot read partition",
    "alloc@0": GATHER.format(tag="alloc_at_0", rank=0)
    + "allocating memory for the gathered weights failed: injected: cannot allocate 6.4 GB",
    "host-copy@0": GATHER.format(tag="host_copy_at_0", rank=0)
    + "copying gathered weights (partition 0, offset 0) to host memory failed: injected: host out of memory",
    "write@0": "save 'write_at_0' failed on rank 0 while writing {dir}/write_at_0.pt: "
    + FULL.replace("{file}", "write_at_0.pt"),
    "verify@0": "save 'verify_at_0' failed on rank 0 while writing {dir}/verify_at_0.pt: {dir}/verify_at_0.pt "
    "failed verification (1 problem(s)):\n  - 'encoder.global_cmvn.mean': values differ from those gathered "
    "(crc32 <crc>, expected <crc>)",
    # Reported at the next save, under the failed save's own tag.
    "background@0": "save 'background_at_0' failed on rank 0 while gathering the weights and writing "
    "{dir}/background_at_0.pt in the background: " + FULL.replace("{file}", "background_at_0.pt"),
    "background-gather@1": "save 'background_gather_at_1' failed on rank 1 while gathering the weights and the "
    "optimizer state and writing {dir}/background_gather_at_1.pt in the background: rank 1: reading elements "
    "256..384 of the fp32 partition failed: injected: cannot read the copy",
    "background-optimizer@1": "save 'background_optimizer_at_1' failed on rank 1 while gathering the weights and "
    "the optimizer state and writing {dir}/background_optimizer_at_1.pt in the background: rank 1: reading "
    "elements 256..384 of the fp32 partition failed: injected: cannot read the copy",
    "background-verify@0": "save 'background_verify_at_0' failed on rank 0 while gathering the weights and the "
    "optimizer state and writing {dir}/background_verify_at_0.pt in the background: "
    "{dir}/background_verify_at_0.pt failed verification (1 problem(s)):\n  - 'encoder.global_cmvn.mean': values "
    "differ from those gathered (crc32 <crc>, expected <crc>)",
    "background-commit@0": "save 'background_commit_at_0' failed on rank 0 while gathering the weights and the "
    "optimizer state and writing {dir}/background_commit_at_0.pt in the background: could not write "
    "{dir}/background_commit_at_0.pt: Input/output error (OSError)",
}
# scenario -> the last line of the failing rank's traceback, which every rank's SaveError carries.
RAISED = {
    "gather@1": "ConsolidationError: rank 1: reading elements",
    "gather@0": "ConsolidationError: rank 0: reading elements",
    "alloc@0": "ConsolidationError: rank 0: allocating memory",
    "host-copy@0": "ConsolidationError: rank 0: copying gathered weights",
    "write@0": "CheckpointWriteError: could not write",
    "verify@0": "VerificationError: ",
    "background@0": "CheckpointWriteError: could not write",
    "background-gather@1": "ConsolidationError: rank 1: reading elements",
    "background-optimizer@1": "ConsolidationError: rank 1: reading elements",
    "background-verify@0": "VerificationError: ",
    "background-commit@0": "CheckpointWriteError: could not write",
}
# scenario -> the files rank 0's verification helper checked during it: a background save's, never another's
# (background@0: the disk filled before anything was sealed; a failure on rank 1: rank 0 sealed the weights
# before the vote told it; background-commit@0: both sealed, then the rename failed).
VERIFIED_IN_HELPER = {"background-gather@1": 1, "background-optimizer@1": 1, "background-verify@0": 1,
                      "background-commit@0": 2}


def message_pattern(template: str, model_dir) -> str:
    pattern = re.escape(template.replace("{dir}", str(model_dir)))
    return (pattern.replace(re.escape("<n>"), r"[0-9.]+").replace(re.escape("<crc>"), "[0-9a-f]{8}")
            .replace(re.escape("[kMG]"), "[kMG]"))


@pytest.mark.parametrize("stage", [2, 3])
def test_a_failure_on_one_rank_in_any_phase_ends_the_save_on_every_rank_in_seconds(tmp_path, stage):
    """tests/jobs/fault_job.py injects one failure per save (rank 1 or rank 0; gather, allocation,
    host copy, write, verify, background write, gather, verify and commit), each followed by a save that must
    work. A background save's files are verified in rank 0's helper process, which finds the corruption."""
    run_torchrun(JOBS / "fault_job.py", str(tmp_path), str(stage), timeout=900)  # every rank exits 0
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert list(seen[0]) == list(EXPECTED)
    # No step is taken between the saves: each one written holds DeepSpeed's own reconstruction of
    # the sharded save made before the first fault, bit for bit.
    reference = dict(deepspeed_reference(tmp_path, "reference", build_model()))
    for scenario, template in EXPECTED.items():
        tag = seen[0][scenario]["tag"]
        messages = [s[scenario]["message"] for s in seen]
        assert messages[0] == messages[1], scenario  # every rank raised the same SaveError
        failing = int(scenario[-1])
        where = [s[scenario]["traceback"] for s in seen]  # the other rank carries the failing rank's
        assert where[failing] == "" and RAISED[scenario] in where[1 - failing], (scenario, where)
        assert re.fullmatch(message_pattern(template, tmp_path), messages[0]), (scenario, messages[0])
        print(f"{scenario}: failing save ended on both ranks in "
              f"{max(s[scenario]['seconds'] for s in seen):.2f} s")
        assert all(s[scenario]["seconds"] < 60 for s in seen), scenario
        assert seen[0][scenario]["helper_verified"] == VERIFIED_IN_HELPER.get(scenario, 0), scenario
        assert seen[1][scenario]["helper_verified"] == 0 and seen[1][scenario]["helper_pid"] is None, scenario
        if scenario in VERIFIED_IN_HELPER:  # another process: the helper, still there for the next save
            assert seen[0][scenario]["helper_pid"] not in (None, seen[0][scenario]["pid"]), scenario
        # A save commits as a whole: the weights sent in full are not published without their optimizer file.
        assert not (tmp_path / f"{tag}.pt").exists() and not (tmp_path / f"{tag}.optim").exists(), scenario
        assert_state_dicts_equal(torch.load(tmp_path / f"{tag}_then.pt", weights_only=True), reference)
    assert not list(tmp_path.glob("*.tmp"))


def test_rank0_killed_while_writing_leaves_no_file_and_the_offline_command_recovers(tmp_path):
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, launch_env

    env = launch_env()
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(JOBS / "kill_job.py"), str(tmp_path)], env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "writing").exists():
            assert job.poll() is None, f"the job ended (exit {job.returncode}) before writing"
            assert time.monotonic() < deadline, "the job never reached the write"
            time.sleep(0.2)
    finally:
        # SIGKILL: no cleanup code runs. Rank 0 dies mid-write; rank 1 and the launcher with it.
        for pid_file in sorted(tmp_path.glob("pid*")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            pid_file.unlink()
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not (tmp_path / "step_2.pt").exists()
    assert (tmp_path / "step_2.pt.tmp").is_file()  # at most a temporary file...
    reference = deepspeed_reference(tmp_path, "step_2", build_model())  # ...and the sharded save intact
    convert = [CONVERT, f"model_dir={tmp_path}", "tag=step_2"]
    subprocess.run(convert, check=True, capture_output=True, timeout=300)
    assert not (tmp_path / "step_2.pt.tmp").exists()  # recognised and removed
    assert_state_dicts_equal(dict(sorted(torch.load(tmp_path / "step_2.pt", weights_only=True).items())),
                             dict(sorted(reference.items())))
