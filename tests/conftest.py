"""Shared test plumbing: real multi-rank launches and a guard against stray files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).resolve().parent / "jobs"
# A WeNet-shaped stand-in (tests/standin/README.md); on PYTHONPATH as users put WeNet.
STANDIN = Path(__file__).resolve().parent / "standin"

# DeepSpeed on the CPU: its CPU accelerator, gloo, one thread per rank so two
# ranks share two cores without oversubscription.
DIST_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "PYTHONUNBUFFERED": "1",
}
os.environ.update(DIST_ENV)


def run_torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 600,
                 env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``nproc`` real ranks with torchrun and return its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    full_env = {**os.environ, **DIST_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(JOBS), str(STANDIN)]),
                **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"{script.name} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                    f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def _repo_files() -> set[str]:
    skip = {".venv", ".git", ".pytest_cache", "__pycache__"}
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        found.update(os.path.join(root, f) for f in files)
    return found


@pytest.fixture(autouse=True)
def no_stray_files():
    """Fail a test that leaves files in the repository (outside tmp_path)."""
    before = _repo_files()
    yield
    stray = sorted(_repo_files() - before)
    if stray:
        pytest.fail(f"test left files behind: {stray[:10]}")
