"""In-training benchmarks (questions 1 and 2): one 2-rank DeepSpeed job per model size and stage.

    python bench/in_training.py [--params 53e6 258e6] [--stages 2 3] [--repeats 3]

Each job (bench/train_job.py) alternates the compared saves ``--repeats``
times and prints its rows; this driver only launches the jobs in turn.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[53e6, 258e6])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wenet_hooks_bench_train"))
    args = parser.parse_args()
    job = Path(__file__).resolve().parent / "train_job.py"
    for params in args.params:
        for stage in args.stages:
            shutil.rmtree(args.workdir, ignore_errors=True)
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   str(job), "--params", str(params), "--stage", str(stage),
                                   "--repeats", str(args.repeats), "--out", str(args.workdir)],
                                  env=ENV, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"train_job failed:\n{proc.stderr[-3000:]}")
            print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("|") or not line),
                  flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
