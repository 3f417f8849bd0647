"""Offline conversion: ``wenet-hooks-convert`` vs DeepSpeed's ``zero_to_fp32.py`` (question 3),
and the write throughput against the disk's floor (question 4).

    python bench/offline.py [--params 53e6 258e6] [--stages 2 3] [--repeats 3] [--workdir /tmp/wh-bench]

Each checkpoint is made by real DeepSpeed training (2 CPU ranks, one AdamW
step). Then, as fresh processes under ``/usr/bin/time -v``, in a rotating
order, ``--repeats`` times each (medians):
- ``wenet-hooks-convert`` (read the shards, write ``<tag>.pt.tmp`` with its
  CRC-32s, fsync, read it back and check every tensor's CRC-32, rename);
- the physical floor: ``import torch``, then the same number of bytes written
  in 64 MiB chunks and ``fdatasync``;
- ``zero_to_fp32.py`` followed by ``sync`` (it does not flush what it wrote);
- what bounds the first two: ``import torch`` alone, and the converter's dry run.
Outputs are removed between runs, outside the clock (no command pays for deleting or replacing a
file), and before each command the disk is left to settle (``sync``, then 2 s; ``BENCH_SETTLE_S``),
so none pays for the previous one's writes or freed blocks.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table  # noqa: E402

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TAG = "step_1"
# The console script installed beside this interpreter (the venv need not be on PATH).
CONVERT = str(Path(sys.executable).parent / "wenet-hooks-convert")


def make_checkpoint(model_dir: Path, params: float, stage: int) -> None:
    job = Path(__file__).resolve().parent / "train_job.py"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(job),
                    "--params", str(params), "--stage", str(stage), "--out", str(model_dir), "--save_only", TAG],
                   check=True, env=ENV, capture_output=True)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of a fresh process."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return seconds, rss_kb / 2**20


def ours(model_dir: Path) -> tuple[float, float]:
    # Its previous output is removed before the clock starts, as zero_to_fp32.py's is (a first
    # conversion; replacing a 1 GB file would add the file system's 0.2-0.8 s of freeing its blocks).
    (model_dir / f"{TAG}.pt").unlink(missing_ok=True)
    return timed([CONVERT, f"model_dir={model_dir}", f"tag={TAG}"])


def deepspeeds(model_dir: Path) -> tuple[float, float]:
    out = model_dir / "ds_out"
    shutil.rmtree(out, ignore_errors=True)
    script = f"{shlex.quote(sys.executable)} {shlex.quote(str(model_dir / 'zero_to_fp32.py'))} " \
             f"{shlex.quote(str(model_dir))} {shlex.quote(str(out))} -t {TAG} && sync"
    result = timed(["sh", "-c", script])
    shutil.rmtree(out)
    return result


FLOOR = """
import os, sys, torch
path, nbytes, chunk = sys.argv[1], int(sys.argv[2]), os.urandom(64 * 2**20)
with open(path, "wb") as f:
    for lo in range(0, nbytes, len(chunk)):
        f.write(chunk[:min(len(chunk), nbytes - lo)])
    f.flush()
    os.fdatasync(f.fileno())
"""


def physical_floor(model_dir: Path, nbytes: int) -> tuple[float, float]:
    result = timed([sys.executable, "-c", FLOOR, str(model_dir / "floor.bin"), str(nbytes)])
    (model_dir / "floor.bin").unlink()
    return result


def settle() -> None:
    """Start each command on a quiet disk: what the last one wrote is flushed, and the blocks freed by
    removing its output (a file of the checkpoint's size, outside the clock; with ``discard`` the file
    system trims them at its next commit) are given back before the clock starts."""
    os.sync()
    time.sleep(float(os.environ.get("BENCH_SETTLE_S", "2")))


def import_torch() -> tuple[float, float]:
    return timed([sys.executable, "-c", "import torch"])


def dry_run(model_dir: Path) -> tuple[float, float]:
    return timed([CONVERT, f"model_dir={model_dir}", f"tag={TAG}", "overwrite=true", "dry_run=true"])


def disk_floor(folder: Path, nbytes: int) -> float:
    """MB/s of writing ``nbytes`` in 64 MiB chunks, then fsync (what dd conv=fdatasync does)."""
    chunk = os.urandom(64 * 2**20)
    path = folder / "floor.bin"
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return max(1, nbytes // len(chunk)) * len(chunk) / 1e6 / seconds


def write_throughput(model_dir: Path) -> float:
    """MB/s of write_state_dict alone (write + fsync + rename, no verification) on this checkpoint's weights."""
    import torch

    from wenet_hooks import write_state_dict

    state_dict = torch.load(model_dir / f"{TAG}.pt", map_location="cpu", weights_only=True)
    state_dict = {k: v.clone() for k, v in state_dict.items()}
    started = time.perf_counter()
    path = write_state_dict(state_dict, model_dir / "throughput.pt")
    seconds = time.perf_counter() - started
    nbytes = path.stat().st_size
    path.unlink()
    return nbytes / 1e6 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[53e6, 258e6])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wenet_hooks_bench"))
    args = parser.parse_args()
    rows, floor_rows = [], []
    for params in args.params:
        for stage in args.stages:
            model_dir = args.workdir / f"p{params:.0f}_z{stage}"
            shutil.rmtree(model_dir, ignore_errors=True)
            make_checkpoint(model_dir, params, stage)
            ours(model_dir)  # the file whose size the floor writes; the shards now in the page cache
            nbytes = (model_dir / f"{TAG}.pt").stat().st_size
            sides = {"ours": lambda: ours(model_dir), "floor": lambda: physical_floor(model_dir, nbytes),
                     "zero_to_fp32": lambda: deepspeeds(model_dir), "import": import_torch,
                     "dry": lambda: dry_run(model_dir)}
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
            order = list(sides)
            for i in range(args.repeats):
                for name in order[i % len(order):] + order[:i % len(order)]:
                    settle()
                    runs[name].append(sides[name]())
            wall = {name: median([r[0] for r in rs]) for name, rs in runs.items()}
            rss = {name: median([r[1] for r in rs]) for name, rs in runs.items()}
            size = f"{params / 1e6:.0f}M, ZeRO-{stage}"
            rows.append([size, f"{nbytes / 1e9:.2f} GB", f"{wall['ours']:.2f}", f"{wall['floor']:.2f}",
                         f"{wall['ours'] / wall['floor']:.2f}", f"{wall['ours'] - wall['floor']:+.2f}",
                         f"{wall['zero_to_fp32']:.2f}",
                         f"{wall['ours'] / wall['zero_to_fp32']:.2f}", f"{wall['import']:.2f}", f"{wall['dry']:.2f}",
                         f"{wall['dry'] - wall['import']:+.2f}",
                         f"{rss['ours']:.2f}", f"{rss['zero_to_fp32']:.2f}"])
            floor, ours_mb = disk_floor(model_dir, nbytes), write_throughput(model_dir)
            floor_rows.append([size, f"{nbytes / 1e9:.2f} GB", f"{floor:.0f}", f"{ours_mb:.0f}",
                               f"{ours_mb / floor:.2f}"])
            shutil.rmtree(model_dir)
    print(table(["checkpoint", "file", "wenet-hooks-convert (s)", "floor: import torch + write + fdatasync (s)",
                 "/ floor", "beyond the floor (s)", "zero_to_fp32.py + sync (s)", "/ zero_to_fp32", "import torch (s)",
                 "dry run (s)", "dry run beyond import torch (s)",
                 "our peak RSS (GiB)", "its peak RSS (GiB)"], rows))
    print()
    print(table(["checkpoint", "file", "disk floor (MB/s)", "write_state_dict (MB/s)", "fraction of floor"],
                floor_rows))


if __name__ == "__main__":
    main()
