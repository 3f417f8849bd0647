"""Shared test plumbing: the installed package, real multi-rank launches, a guard against stray files.

The suite tests what users install: the package must come from site-packages
(a non-editable wheel), never from this source tree. ``make test`` builds and
installs the wheel; ``WENET_HOOKS_TEST_SOURCE=1`` lets a developer run the
tests against an editable install on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wenet_hooks
from declared_skips import declared
from multirank import MULTIRANK_SKIP_REASON

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
JOBS = TESTS / "jobs"
# A WeNet-shaped stand-in (tests/standin/README.md); on PYTHONPATH as users put WeNet.
STANDIN = TESTS / "standin"
# The installed console script, called as a user calls it.
CONVERT = shutil.which("wenet-hooks-convert", path=str(Path(sys.executable).parent)) or "wenet-hooks-convert"

if (Path(wenet_hooks.__file__).resolve().parent == REPO / "wenet_hooks"
        and os.environ.get("WENET_HOOKS_TEST_SOURCE") != "1"):
    raise pytest.UsageError(
        f"wenet_hooks is imported from the source tree ({wenet_hooks.__file__}), not from an installed wheel; "
        "HINT: run `make test`, which installs the wheel, or set WENET_HOOKS_TEST_SOURCE=1 on purpose")

# Real checkpoints written by WeNet's own train.py (../shared beside the clone, as in CI): every test of
# what reads checkpoints uses them, so their absence stops the run instead of skipping those tests.
FIXTURES = REPO.parent / "shared" / "fixtures" / "wenet"
if not FIXTURES.is_dir():
    raise pytest.UsageError(f"{FIXTURES} is missing; HINT: clone this repository beside the project's shared/ "
                            "folder, which holds WeNet's real checkpoints")

# DeepSpeed on the CPU: its CPU accelerator, gloo, one thread per rank so two
# ranks share two cores without oversubscription.
DIST_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "PYTHONUNBUFFERED": "1",
}
os.environ.update(DIST_ENV)


def launch_env(*first_on_path: Path, **env: str) -> dict[str, str]:
    """The environment of a launched job: test support, jobs and the stand-in importable, not the source tree."""
    path = [*first_on_path, TESTS, JOBS, STANDIN]
    return {**os.environ, **DIST_ENV, "PYTHONPATH": os.pathsep.join(map(str, path)), **env}


def run_torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 600,
                 env: dict[str, str] | None = None, check: bool = True,
                 launcher: tuple[str, ...] = ("--standalone",)) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``nproc`` real ranks with torchrun and return its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
           str(script), *args]
    full_env = launch_env(**(env or {}))
    if env and "PYTHONPATH" in env:
        full_env["PYTHONPATH"] = env["PYTHONPATH"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"{Path(script).name} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                    f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def _repo_files() -> set[str]:
    skip = {".venv", ".git", ".pytest_cache", "__pycache__", ".compat", "build", "dist"}
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        found.update(os.path.join(root, f) for f in files)
    return found


@pytest.fixture(params=["streamed", "torch.save"])
def writer(request, monkeypatch):
    """The file writer under test: streamed (torch >= 2.6, skipped below) or torch.save (any torch)."""
    import wenet_hooks.file.writer as layout_module
    from wenet_hooks.compat import can_stream

    if request.param == "torch.save":
        monkeypatch.setattr(layout_module, "can_stream", lambda: False)
    elif not can_stream():
        pytest.skip("the streamed writer needs torch.serialization.skip_data (torch >= 2.6)")
    else:  # each test lays its first file out with torch.save (none kept from another test's entries)
        import wenet_hooks.file.skeleton as skeleton

        monkeypatch.setattr(skeleton, "_KEPT", type(skeleton._KEPT)())
    return request.param


@pytest.fixture(autouse=True)
def no_stray_files():
    """Fail a test that leaves files in the repository (outside tmp_path)."""
    before = _repo_files()
    yield
    stray = sorted(_repo_files() - before)
    if stray:
        pytest.fail(f"test left files behind: {stray[:10]}")


# ZeRO stage x precision x optimizer offload, as the matrix job names them.
CASES = [
    f"z{stage}-{precision}-{offload}"
    for stage in (0, 1, 2, 3)
    for precision in ("fp32", "bf16")
    for offload in (("nooffload",) if stage == 0 else ("nooffload", "offload"))
]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip not declared for this torch/DeepSpeed pair in tests/declared_skips.py is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not declared(reason):
            report.outcome = "failed"
            report.longrepr = f"undeclared skip (declare it in tests/declared_skips.py, or fix the cause): {reason}"


def pytest_collection_modifyitems(config, items):
    """Multi-rank tests need collectives that old torch's gloo lacks: skipped there, with the reason."""
    if MULTIRANK_SKIP_REASON:
        for item in items:
            if "multirank" in item.keywords or "matrix" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.skip(reason=MULTIRANK_SKIP_REASON))


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """One real 2-rank DeepSpeed job over every case (tests/jobs/consolidate_matrix.py).

    Per case: a sharded checkpoint ``step_3/`` and our ``step_3.pt`` of the same step.
    """
    out = tmp_path_factory.mktemp("matrix")
    proc = run_torchrun(JOBS / "consolidate_matrix.py", str(out), *CASES, timeout=1200, check=False)
    return out, proc


@pytest.fixture(scope="session")  # session: set up before the module-scoped jobs that need it
def deepspeed_trains(matrix):
    """Skips a test that trains ZeRO-1/2/3 where this DeepSpeed itself cannot on CPU ranks here
    (recorded, with DeepSpeed's own error, by the matrix job), instead of failing in DeepSpeed."""
    out, _ = matrix
    for case in ("z1-fp32-nooffload", "z2-fp32-nooffload", "z3-fp32-nooffload"):
        result = out / case / "result.json"
        status = json.loads(result.read_text()) if result.exists() else {}
        if status.get("cannot_train"):
            import deepspeed
            import torch

            pytest.skip(f"DeepSpeed {deepspeed.__version__} with torch {torch.__version__} cannot train {case} on "
                        f"CPU ranks: {status['cannot_train']}")


def case_dir(matrix, case):
    """The output folder of one case of the session's DeepSpeed job (conftest.matrix)."""
    out, proc = matrix
    result = out / case / "result.json"
    if not result.exists():
        pytest.fail(f"the job never reached {case}; exit {proc.returncode}\n{proc.stderr[-4000:]}")
    status = json.loads(result.read_text())
    if status.get("cannot_train"):
        import deepspeed
        import torch

        pytest.skip(f"DeepSpeed {deepspeed.__version__} with torch {torch.__version__} cannot train {case} on "
                    f"CPU ranks: {status['cannot_train']}")
    assert status["ok"], status.get("error")
    return out / case
