"""A background save's verification in rank 0's helper process (wenet_hooks.file.verifier).

The helper must find what the verification in the training process finds, in
another process; where it gives no answer, the file is verified in the
training process all the same; and it never outlives the process that
started it. (Its use by a real background save: tests/test_faults.py.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wenet_hooks import Manifest, verify, write_state_dict
from wenet_hooks.errors import VerificationError
from wenet_hooks.file.verifier import Verifier


def tiny_state_dict() -> dict[str, torch.Tensor]:
    tied = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    return {"embed.weight": tied, "output.weight": tied, "norm.bias": torch.ones(3, dtype=torch.bfloat16),
            "steps": torch.tensor(5)}


def written(tmp_path: Path) -> tuple[Path, Manifest, Path]:
    """A file, what it must hold, and a copy of it with one byte of the tied tensor flipped."""
    state_dict = tiny_state_dict()
    good = tmp_path / "model.pt"
    write_state_dict(state_dict, good)
    raw = bytearray(good.read_bytes())
    at = raw.find(state_dict["embed.weight"].numpy().tobytes()[:64])
    assert at > 0
    raw[at + 8] ^= 0x01
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(bytes(raw))
    return good, Manifest.from_state_dict(state_dict), bad


def problems_of(check, path: Path, expected: Manifest) -> list[str]:
    with pytest.raises(VerificationError) as raised:
        check(path, expected)
    return raised.value.problems


def test_manifest_travels_whole():
    manifest = Manifest.from_state_dict(tiny_state_dict())
    assert manifest.tied == (("embed.weight", "output.weight"),)
    assert all(spec.checksum is not None for spec in manifest.tensors.values())
    assert Manifest.from_plain(manifest.to_plain()) == manifest


def test_the_helper_finds_what_the_training_process_finds(tmp_path):
    good, expected, bad = written(tmp_path)
    verifier = Verifier()
    try:
        verifier.verify(good, expected)
        assert verifier.pid not in (None, os.getpid())
        found = problems_of(verifier.verify, bad, expected)
        assert found == problems_of(verify, bad, expected)  # in this process, by the same function
        assert found == [f"'{key}': values differ from those gathered (crc32 {crc}, expected {want})"
                         for key, crc, want in _crcs(bad, expected)]
        missing = problems_of(verifier.verify, tmp_path / "absent.pt", expected)
        assert missing == ["does not exist"]
        assert verifier.verified == 3
    finally:
        verifier.close()
    assert verifier.pid is None


def _crcs(path: Path, expected: Manifest) -> list[tuple[str, str, str]]:
    """(key, crc32 found, crc32 expected) of the tensors whose bytes differ, computed here with zlib."""
    import zlib

    loaded = torch.load(path, weights_only=True)
    out = []
    for key, spec in expected.tensors.items():
        crc = zlib.crc32(loaded[key].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        if crc != spec.checksum:
            out.append((key, f"{crc:08x}", f"{spec.checksum:08x}"))
    return out


def test_a_helper_that_ended_is_started_again(tmp_path, caplog):
    good, expected, bad = written(tmp_path)
    verifier = Verifier()
    try:
        verifier.start()
        first = verifier.pid
        os.kill(first, signal.SIGKILL)
        _wait_gone(first)
        with caplog.at_level(logging.WARNING, logger="wenet_hooks.file.verifier"):
            assert problems_of(verifier.verify, bad, expected) == problems_of(verify, bad, expected)
        assert verifier.pid not in (None, first) and verifier.verified == 1
        assert f"the verification helper (pid {first}) had ended (exit code -9); starting another" in caplog.text
    finally:
        verifier.close()


def test_without_an_answer_the_training_process_verifies_the_file(tmp_path, caplog):
    """A helper that ends mid-request (here: it reads the request and exits): the file is verified here."""
    good, expected, bad = written(tmp_path)
    dies = (sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(3)")
    verifier = Verifier(command=dies)
    try:
        with caplog.at_level(logging.WARNING, logger="wenet_hooks.file.verifier"):
            verifier.verify(good, expected)  # right: no error
            assert problems_of(verifier.verify, bad, expected) == problems_of(verify, bad, expected)
        assert verifier.verified == 0
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 2 and all("did not verify" in m and "it ended; verifying it in the training process"
                                      in m for m in said), said
        assert str(good) in said[0] and str(bad) in said[1]
    finally:
        verifier.close()


def test_a_helper_that_cannot_start_leaves_the_verification_here(tmp_path, caplog):
    good, expected, bad = written(tmp_path)
    verifier = Verifier(command=(str(tmp_path / "no-such-python"), "-c", "pass"))
    with caplog.at_level(logging.WARNING, logger="wenet_hooks.file.verifier"):
        verifier.verify(good, expected)
        assert problems_of(verifier.verify, bad, expected) == problems_of(verify, bad, expected)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "could not start the verification helper" in said[0], said  # once, not per file
    assert verifier.pid is None


def test_the_helper_never_outlives_its_training_process(tmp_path):
    """SIGKILL of the process that started it (no clean-up runs): its stdin closes and it exits."""
    code = ("import os, signal, sys\n"
            "from wenet_hooks.file.verifier import helper\n"
            "helper().start()\n"
            "print(helper().pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _wait_gone(int(proc.stdout.strip()))


def _wait_gone(pid: int, seconds: float = 60) -> None:
    """Until ``pid`` has exited (a zombie left to a parent that does not reap counts as exited)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {seconds} s")
