"""What a background thread's calls into torch cost the training thread, by how much each call does.

    python bench/gil_handoff.py [--seconds 2] [--repeats 3]

The training thread gives the GIL up in every torch op (a kernel launch on a GPU host, a tiny ``add_``
here). A background thread waiting for the GIL takes it then, and the training thread waits until the
background thread gives it up again, in its next call into C that releases it. So each such call costs
the training thread a round trip, however little the call itself does. This measures the training
thread's op rate while another thread copies 256 MiB of host memory over and over, in chunks of
different sizes (each chunk one ``copy_``), against the same copy done by another process (no GIL
shared: only cores and memory bandwidth). The gap between a chunk size and the process is what the
GIL round trips cost; it is why a background save's staging copies in 16 MB chunks
(``wenet_hooks/gather/staging.py``), and why a save's background work should make few calls.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

_ELEMENTS = 1 << 26  # 256 MiB of fp32
_PROCESS = """
import time, torch
torch.set_num_threads(1)
src = torch.ones({n}); dst = torch.empty_like(src)
until = time.time() + {seconds}
while time.time() < until:
    dst.copy_(src)
"""


def op_rate(seconds: float) -> float:
    """Tiny torch ops per second on this thread for ``seconds``."""
    import torch

    x = torch.zeros(16)
    ops, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(50):
            x.add_(1.0)
        ops += 50
    return ops / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    src, dst = torch.ones(_ELEMENTS), torch.empty(_ELEMENTS)

    def copying(chunk: int, stop: threading.Event) -> None:
        while not stop.is_set():
            for lo in range(0, _ELEMENTS, chunk):
                dst[lo:lo + chunk].copy_(src[lo:lo + chunk])
                if stop.is_set():
                    return

    sides = {"idle": None, "another process, 256 MiB per copy": "process"}
    sides.update({f"a thread, {(chunk * 4) >> 20} MiB per copy": chunk for chunk in (1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26)})
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):  # alternating, so drift in the machine's speed reaches every side
        for name, how in sides.items():
            stop, thread, proc = threading.Event(), None, None
            if how == "process":
                code = _PROCESS.format(n=_ELEMENTS, seconds=args.seconds + 2)
                proc = subprocess.Popen([sys.executable, "-c", code])
                time.sleep(1.0)  # its import and allocation, outside the measure
            elif how is not None:
                thread = threading.Thread(target=copying, args=(how, stop))
                thread.start()
            rates[name].append(op_rate(args.seconds))
            stop.set()
            if thread is not None:
                thread.join()
            if proc is not None:
                proc.wait()
    idle = statistics.median(rates["idle"])
    print("| while | ops/s | drop |\n| --- | --- | --- |")
    for name, found in rates.items():
        rate = statistics.median(found)
        print(f"| {name} | {rate / 1e3:.0f}k | {100 * (1 - rate / idle):.1f} % |")


if __name__ == "__main__":
    main()
