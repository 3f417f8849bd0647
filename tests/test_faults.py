"""Failures during a save end the save on every rank together, in seconds, never in a hang.

Real 2-rank DeepSpeed jobs on the CPU (gloo); the failure is injected by the
job script (tests/jobs/fault_job.py), not mocked in the library.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import JOBS, run_torchrun
from wenet_hooks.demo.model import build_model


@pytest.mark.parametrize("stage", [2, 3])
def test_rank0_failure_mid_gather_is_shared_and_collectives_stay_matched(tmp_path, stage):
    # Judged by what each rank recorded, so a crash in the interpreter's own
    # teardown (seen once: gloo threads at exit) is not mistaken for the behaviour.
    proc = run_torchrun(JOBS / "fault_job.py", str(tmp_path), str(stage), timeout=180, check=False)
    missing = [r for r in (0, 1) if not (tmp_path / f"rank{r}.json").exists()]
    assert not missing, f"ranks {missing} never finished (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = ("save 'step_2' failed on rank 0 while gathering the weights: rank 0: copying "
                "'encoder.norm.weight' to host memory failed: injected: host out of memory")
    assert [s["first"] for s in seen] == [expected, expected]
    assert [s["second"] for s in seen] == ["ok", "ok"]
    assert not (tmp_path / "step_2.pt").exists()
    assert list(torch.load(tmp_path / "step_2_again.pt", weights_only=True)) == list(build_model().state_dict())
