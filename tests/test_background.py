"""BackgroundWriter: one job at a time, failures kept for the next save."""

from __future__ import annotations

import threading
import time

from wenet_hooks.background import BackgroundWriter


def test_jobs_run_one_at_a_time_in_order():
    writer, done, running = BackgroundWriter(), [], threading.Lock()

    def job(n):
        def run():
            assert running.acquire(blocking=False), "two jobs ran at once"
            time.sleep(0.05)
            done.append(n)
            running.release()
        return run

    for n in range(3):
        writer.submit(job(n), f"step_{n}", f"job {n}")
    assert writer.wait() is None
    assert done == [0, 1, 2]


def test_a_failure_is_reported_once_by_wait():
    writer = BackgroundWriter()

    def fail():
        raise OSError(28, "No space left on device")

    writer.submit(fail, "epoch_3", "writing exp/epoch_3.pt")
    failed = writer.wait()
    # The failed write keeps its own tag (the next save, which reports it, has another).
    assert (failed.tag, failed.what, failed.failure.rank, failed.failure.message) == (
        "epoch_3", "writing exp/epoch_3.pt", 0, "[Errno 28] No space left on device")
    assert failed.failure.traceback.endswith("OSError: [Errno 28] No space left on device\n")
    assert "raise OSError(28" in failed.failure.traceback
    assert writer.wait() is None


def test_wait_with_nothing_in_flight():
    assert BackgroundWriter().wait() is None
