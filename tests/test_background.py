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
        writer.submit(job(n), f"job {n}")
    assert writer.wait() is None
    assert done == [0, 1, 2]


def test_a_failure_is_reported_once_by_wait():
    writer = BackgroundWriter()

    def fail():
        raise OSError(28, "No space left on device")

    writer.submit(fail, "writing exp/epoch_3.pt")
    assert writer.wait() == "writing exp/epoch_3.pt: [Errno 28] No space left on device"
    assert writer.wait() is None


def test_wait_with_nothing_in_flight():
    assert BackgroundWriter().wait() is None
