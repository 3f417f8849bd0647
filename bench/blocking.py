"""Table 8: what a save blocks training for, now that every save is staged to host memory and gathered,
written and verified in the background; and rank 0's memory while it does.

    python bench/blocking.py [--params 53e6 258e6] [--stages 2 3] [--ranks 2] [--repeats 3]
    python bench/blocking.py --params 53e6 --stages 2 --ranks 2 3 4      # blocking against the world size

One DeepSpeed job per size, stage and world size (CPU ranks, gloo), one optimizer step, then, alternating,
``--repeats`` times each:
- ``save_checkpoint``: DeepSpeed's sharded save alone (what WeNet blocks for today);
- the hook's part of a model+optimizer save (``save_consolidated(..., SaveOptions(optimizer=True),
  writer=...)``): the check, the votes and each rank's copy of its partitions to host memory; with
  ``sharded: false`` this is the whole save;
- the background work after it (gathers, rank 0's streamed writes, verification): what the next save
  waits for when saves follow each other at once.
Rank 0's memory: the most its receiver held at once during the streamed gathers (counted allocation by
allocation), and its peak resident memory over the steady state after training (``ru_maxrss``).
Medians of ``--repeats``; bytes per parameter of the files written.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import deepspeed
    from common import median, sized_model
    from support.tiny_training import ds_config, init_engine
    from wenet_hooks import BackgroundWriter, SaveOptions, save_consolidated, settle_background
    from wenet_hooks.gather import bucketed

    deepspeed.init_distributed(dist_backend="gloo")
    config = ds_config(args.stage)
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    model = sized_model(args.params)
    engine = init_engine(model, config)
    x = torch.randn(2, model[0].in_features)
    engine.backward(F.mse_loss(engine(x), torch.zeros_like(x)))
    engine.step()
    params = sum(p.numel() for p in model.parameters()) if args.stage < 3 else sum(
        p.ds_numel for p in engine.module.parameters())
    peaks = []
    real_run = bucketed.PendingGather.run

    def counted_run(self, on_complete=None):
        gathered = real_run(self, on_complete)
        peaks.append(gathered.peak_bytes)
        return gathered

    bucketed.PendingGather.run = counted_run
    out, writer = args.out, BackgroundWriter()
    sharded, hook, background, written = [], [], [], []
    steady = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def clock(into, work) -> None:
        dist.barrier()
        started = time.perf_counter()
        work()
        dist.barrier()
        into.append(time.perf_counter() - started)

    for i in range(args.repeats):
        plain = lambda: clock(sharded, lambda: engine.save_checkpoint(str(out), tag=f"a{i}"))  # noqa: E731
        ours = lambda: clock(hook, lambda: save_consolidated(  # noqa: E731
            engine, out, f"b{i}", SaveOptions(optimizer=True), writer=writer))
        for run in (plain, ours) if i % 2 == 0 else (ours, plain):
            os.sync()
            run()
            if run is ours:
                clock(background, lambda: settle_background(writer))
        if dist.get_rank() == 0:
            written.append((out / f"b{i}.pt").stat().st_size + (out / f"b{i}.optim").stat().st_size)
            for name in (f"a{i}", f"b{i}.pt", f"b{i}.optim"):
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        dist.barrier()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - steady) / 2**10  # kB -> MB
    if dist.get_rank() == 0:
        s, h, b = median(sharded), median(hook), median(background)
        print(f"| {params / 1e6:.0f}M | ZeRO-{args.stage} | {dist.get_world_size()} | {s:.2f} | {h:.3f} | "
              f"{h / s:.3f} | {b:.2f} | {max(peaks) / 2**20:.1f} | {grown:.0f} | "
              f"{median(written) / params:.1f} |", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[53e6, 258e6])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/wenet_hooks_bench_blocking"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.params = args.params[0]
        return worker(args)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    print("| model | stage | ranks | save_checkpoint (s) | hook blocking (s) | hook / save_checkpoint | "
          "background after (s) | rank 0 receiver peak (MB) | rank 0 peak RSS growth (MB) | file bytes / param |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for params in args.params:
        for stage in args.stages:
            for ranks in args.ranks:
                shutil.rmtree(args.out, ignore_errors=True)
                args.out.mkdir(parents=True)
                proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       f"--nproc_per_node={ranks}", __file__, "--worker", "--params", str(params),
                                       "--stage", str(stage), "--repeats", str(args.repeats),
                                       "--out", str(args.out)], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"blocking worker failed:\n{proc.stderr[-3000:]}")
                print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("|")), flush=True)
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
