"""Table 8: what a save blocks training for, now that every save is staged to host memory and gathered,
written and verified in the background; and rank 0's memory while it does.

    python bench/blocking.py [--params 53e6 258e6] [--stages 2 3] [--ranks 2] [--repeats 3]
    python bench/blocking.py --params 53e6 --stages 2 --ranks 2 3 4      # blocking against the world size

One DeepSpeed job per size, stage and world size (CPU ranks, gloo), one optimizer step, then, alternating,
``--repeats`` times each:
- ``save_checkpoint``: DeepSpeed's sharded save alone (what WeNet blocks for today);
- the hook's part of a model+optimizer save (``save_consolidated(..., SaveOptions(optimizer=True),
  writer=...)``): the inspection, the layout's agreement and the votes; each rank's copy of its
  partitions to host memory, and the check with it, are taken by the save's background job while
  training goes on, and the next optimizer step waits for them; with ``sharded: false`` this is the
  whole save;
- the background work after it (the copies and the check, the gathers, rank 0's streamed writes,
  verification): what the next save waits for when saves follow each other at once;
- then, in a second round of saves, one training step right after each (forward, backward, step),
  next to one without a save in flight, and how long its optimizer step waited for the copies (on 2
  cores the background work also slows the step down: it shares the cores).
Rank 0's memory: the most its receiver held at once during the streamed gathers (counted allocation by
allocation), and its peak resident memory over the steady state after training (``ru_maxrss``, over the
first round of saves).
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
    from wenet_hooks.gather.staging import step_wait_seconds

    deepspeed.init_distributed(dist_backend="gloo")
    config = ds_config(args.stage)
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    model = sized_model(args.params)
    engine = init_engine(model, config)
    x = torch.randn(2, model[0].in_features)

    def train_step() -> None:
        engine.backward(F.mse_loss(engine(x), torch.zeros_like(x)))
        engine.step()

    train_step()
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
    sharded, hook, background, written, step_alone, step_after, held = [], [], [], [], [], [], []
    steady = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def clock(into, work) -> None:
        dist.barrier()
        started = time.perf_counter()
        work()
        dist.barrier()
        into.append(time.perf_counter() - started)

    def round_of_saves(name: str, with_step: bool) -> None:
        """Both sides once, in ``name``'s order; with ``with_step``, one training step after each save."""
        plain = lambda: clock(sharded, lambda: engine.save_checkpoint(str(out), tag=f"a{name}"))  # noqa: E731
        ours = lambda: clock(hook, lambda: save_consolidated(  # noqa: E731
            engine, out, f"b{name}", SaveOptions(optimizer=True), writer=writer))
        for run in (plain, ours) if int(name[-1]) % 2 == 0 else (ours, plain):
            os.sync()
            run()
            if run is ours and with_step:
                waited = step_wait_seconds(engine)
                clock(step_after, train_step)
                held.append(step_wait_seconds(engine) - waited)
                settle_background(writer)
            elif run is ours:
                clock(background, lambda: settle_background(writer))
            elif with_step:
                clock(step_alone, train_step)
        if dist.get_rank() == 0:
            written.append((out / f"b{name}.pt").stat().st_size + (out / f"b{name}.optim").stat().st_size)
            for file in (f"a{name}", f"b{name}.pt", f"b{name}.optim"):
                path = out / file
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        dist.barrier()

    # First the saves alone (rank 0's memory, the background's length), then each followed by a step.
    for i in range(args.repeats):
        round_of_saves(f"s{i}", with_step=False)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - steady) / 2**10  # kB -> MB
    for i in range(args.repeats):
        round_of_saves(f"t{i}", with_step=True)
    if dist.get_rank() == 0:
        s, h, b = median(sharded), median(hook), median(background)
        print(f"| {params / 1e6:.0f}M | ZeRO-{args.stage} | {dist.get_world_size()} | {s:.2f} | {h:.3f} | "
              f"{h / s:.3f} | {median(step_alone):.2f} | {median(step_after):.2f} | {median(held):.2f} | "
              f"{b:.2f} | {max(peaks) / 2**20:.1f} | {grown:.0f} | {median(written) / params:.1f} |", flush=True)
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
          "step alone (s) | step right after (s) | of which held for the copies (s) | background after (s) | "
          "rank 0 receiver peak (MB) | rank 0 peak RSS growth (MB) | file bytes / param |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
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
