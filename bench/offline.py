"""Offline conversion: ``wenet-hooks-convert`` vs DeepSpeed's ``zero_to_fp32.py`` (question 3),
and the write throughput against the disk's floor (question 4).

    python bench/offline.py [--params 53e6 258e6] [--stages 2 3] [--repeats 3] [--workdir /tmp/wh-bench]

Each checkpoint is made by real DeepSpeed training (2 CPU ranks, one AdamW
step); both converters then run on it as fresh processes under
``/usr/bin/time -v``, alternating, ``--repeats`` times each; medians.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table  # noqa: E402

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TAG = "step_1"


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
    convert = shutil.which("wenet-hooks-convert") or "wenet-hooks-convert"
    return timed([convert, f"model_dir={model_dir}", f"tag={TAG}", "overwrite=true"])


def deepspeeds(model_dir: Path) -> tuple[float, float]:
    out = model_dir / "ds_out"
    shutil.rmtree(out, ignore_errors=True)
    result = timed([sys.executable, str(model_dir / "zero_to_fp32.py"), str(model_dir), str(out), "-t", TAG])
    shutil.rmtree(out)
    return result


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
            our_runs, ds_runs = [], []
            for _ in range(args.repeats):
                our_runs.append(ours(model_dir))
                ds_runs.append(deepspeeds(model_dir))
            o_wall, o_rss = median([r[0] for r in our_runs]), median([r[1] for r in our_runs])
            d_wall, d_rss = median([r[0] for r in ds_runs]), median([r[1] for r in ds_runs])
            size = f"{params / 1e6:.0f}M, ZeRO-{stage}"
            rows.append([size, f"{o_wall:.1f}", f"{d_wall:.1f}", f"{o_wall / d_wall:.2f}",
                         f"{o_rss:.2f}", f"{d_rss:.2f}", f"{o_rss / d_rss:.2f}"])
            nbytes = (model_dir / f"{TAG}.pt").stat().st_size
            floor, ours_mb = disk_floor(model_dir, nbytes), write_throughput(model_dir)
            floor_rows.append([size, f"{nbytes / 1e9:.2f} GB", f"{floor:.0f}", f"{ours_mb:.0f}",
                               f"{ours_mb / floor:.2f}"])
            shutil.rmtree(model_dir)
    print(table(["checkpoint", "wenet-hooks-convert (s)", "zero_to_fp32.py (s)", "wall ratio",
                 "our peak RSS (GiB)", "its peak RSS (GiB)", "RSS ratio"], rows))
    print()
    print(table(["checkpoint", "file", "disk floor (MB/s)", "write_state_dict (MB/s)", "fraction of floor"],
                floor_rows))


if __name__ == "__main__":
    main()
