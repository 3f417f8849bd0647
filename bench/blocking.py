"""Table 8: what a save blocks training for, now that every save is staged to host memory and gathered,
written and verified in the background; and rank 0's memory while it does.

    python bench/blocking.py [--params 53e6 258e6] [--stages 2 3] [--ranks 2] [--repeats 3]
    python bench/blocking.py --params 53e6 --stages 2 --ranks 2 3 4      # blocking against the world size
    python bench/blocking.py --params 53e6 258e6 512e6 --precision bf16  # bf16 training: 512M fits 24 GiB

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
Rank 0's memory: the most its receiver held at once during the streamed gathers (its receive buffer
and anything beside it, counted allocation by allocation); the host copies it keeps from save to save (its staged partitions, counted); and its
resident memory's growth over what it held just before each save, to the peak during that save and
its background work (the kernel's high-water mark, reset before each save): for the first save of
ours (which allocates the kept copies), the most over the later ones, and the most over DeepSpeed's
``save_checkpoint``.
The workers run with glibc's mmap threshold fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``): with its
default, sliding threshold, freed tensors of a few MB stay in the heap, so the fp32 model built
before DeepSpeed partitions it stays resident (2 GB per rank at 512M) and RSS no longer says what
the process holds. Both sides run under it.
The hook's blocking also as rank 0's CPU time in the saving thread (``time.thread_time``): its own
work, without the waits for the other ranks' votes, which on a machine with fewer cores than ranks
include waiting for a core; the number of votes a save makes (``all_gather_object`` calls in the
saving thread), and as many votes of nothing taken alone, after the saves: what agreeing costs on
this machine at this world size, whatever the save.
Medians of ``--repeats``; bytes per parameter of the files written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
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
    from wenet_hooks.gather.masters import state_of
    from wenet_hooks.gather.staging import step_wait_seconds

    deepspeed.init_distributed(dist_backend="gloo")
    config = ds_config(args.stage, args.precision)
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    model = sized_model(args.params)
    engine = init_engine(model, config)
    x = torch.randn(2, model[0].in_features, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)

    def train_step() -> None:
        engine.backward(F.mse_loss(engine(x), torch.zeros_like(x)))
        engine.step()

    train_step()
    params = sum(p.numel() for p in model.parameters()) if args.stage < 3 else sum(
        p.ds_numel for p in engine.module.parameters())
    peaks = []
    real_run = bucketed.PendingGather.run

    def counted_run(self, *args, **kwargs):
        gathered = real_run(self, *args, **kwargs)
        peaks.append(gathered)  # the most rank 0's receiving held at once
        return gathered

    bucketed.PendingGather.run = counted_run
    votes_seen, real_all_gather_object = [0], dist.all_gather_object

    def counted_all_gather_object(*a, **k):
        if threading.current_thread() is threading.main_thread():  # the save's foreground, not its job
            votes_seen[0] += 1
        return real_all_gather_object(*a, **k)

    dist.all_gather_object = counted_all_gather_object
    out, writer = args.out, BackgroundWriter()
    sharded, hook, background, written, step_alone, step_after, held = [], [], [], [], [], [], []
    first_growth, later_growth, ds_growth, hook_cpu, votes, bare = [], [], [], [], [], []

    def measured(into, work) -> None:
        """``work``'s peak resident memory over what the process held before it, in MB."""
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark := the resident memory now
        before = _status_kb("VmRSS")
        work()
        into.append((_status_kb("VmHWM") - before) / 2**10)

    def on_cpu(into, work) -> None:
        """The CPU time ``work`` takes in this thread: what the rank computes, without its waits for
        the others (or for a core, where ranks outnumber the cores)."""
        started = time.thread_time()
        work()
        into.append(time.thread_time() - started)

    def voted(work) -> None:
        before = votes_seen[0]
        work()
        votes.append(votes_seen[0] - before)

    def clock(into, work) -> None:
        dist.barrier()
        started = time.perf_counter()
        work()
        dist.barrier()
        into.append(time.perf_counter() - started)

    def round_of_saves(name: str, with_step: bool) -> None:
        """Both sides once, in ``name``'s order; with ``with_step``, one training step after each save."""
        plain = lambda: clock(sharded, lambda: engine.save_checkpoint(str(out), tag=f"a{name}"))  # noqa: E731
        ours = lambda: clock(hook, lambda: on_cpu(hook_cpu, lambda: voted(lambda: save_consolidated(  # noqa: E731
            engine, out, f"b{name}", SaveOptions(optimizer=True), writer=writer))))
        for run in (plain, ours) if int(name[-1]) % 2 == 0 else (ours, plain):
            os.sync()
            if run is ours and with_step:
                run()
                waited = step_wait_seconds(engine)
                clock(step_after, train_step)
                held.append(step_wait_seconds(engine) - waited)
                settle_background(writer)
            elif run is ours:
                measured(later_growth if first_growth else first_growth,
                         lambda: (run(), clock(background, lambda: settle_background(writer))))
            elif with_step:
                run()
                clock(step_alone, train_step)
            else:
                measured(ds_growth, run)
        if dist.get_rank() == 0:
            written.append((out / f"b{name}.pt").stat().st_size + (out / f"b{name}.optim").stat().st_size)
            for file in (f"a{name}", f"b{name}.pt", f"b{name}.optim"):
                path = out / file
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        dist.barrier()

    # First the saves alone (rank 0's memory, the background's length), then each followed by a step.
    for i in range(args.repeats):
        round_of_saves(f"s{i}", with_step=False)
    kept = state_of(engine).pool.nbytes / 2**20
    for i in range(args.repeats):
        round_of_saves(f"t{i}", with_step=True)
    # As many votes as a save makes, alone: what agreeing costs on this machine at this world size.
    for _ in range(args.repeats):
        clock(bare, lambda: [real_all_gather_object([None] * dist.get_world_size(), None) for _ in range(max(votes))])
    if dist.get_rank() == 0:
        s, h, b = median(sharded), median(hook), median(background)
        print(f"| {params / 1e6:.0f}M | {args.precision} | ZeRO-{args.stage} | {dist.get_world_size()} | "
              f"{s:.2f} | {h:.3f} | {h / s:.3f} | {median(hook_cpu):.3f} | "
              f"{max(votes)} | {median(bare):.3f} | {median(step_alone):.2f} | "
              f"{median(step_after):.2f} | {median(held):.2f} | {b:.2f} | {max(peaks) / 2**20:.1f} | {kept:.0f} | "
              f"{first_growth[0]:.0f} | {max(later_growth):.0f} | {max(ds_growth):.0f} | "
              f"{median(written) / params:.1f} |", flush=True)
    dist.destroy_process_group()


def _status_kb(field: str) -> int:
    """A field of /proc/self/status, in kB (``VmRSS``: resident now; ``VmHWM``: its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[53e6, 258e6])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="DeepSpeed's training precision (bf16: bf16 weights and gradients, fp32 masters)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/wenet_hooks_bench_blocking"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.params = args.params[0]
        return worker(args)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    print("| model | precision | stage | ranks | save_checkpoint (s) | hook blocking (s) | hook / save_checkpoint | "
          "of which rank 0's CPU (s) | votes | as many votes alone (s) | step alone (s) | step right after (s) | "
          "of which held for the copies (s) | background after (s) | "
          "rank 0 receiver peak (MB) | rank 0 kept copies (MB) | rank 0 RSS growth, first save (MB) | "
          "later saves (MB) | save_checkpoint (MB) | file bytes / param |")
    print("|" + " --- |" * 20)
    for params in args.params:
        for stage in args.stages:
            for ranks in args.ranks:
                shutil.rmtree(args.out, ignore_errors=True)
                args.out.mkdir(parents=True)
                proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       f"--nproc_per_node={ranks}", __file__, "--worker", "--params", str(params),
                                       "--stage", str(stage), "--repeats", str(args.repeats),
                                       "--precision", args.precision,
                                       "--out", str(args.out)], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"blocking worker failed:\n{proc.stderr[-3000:]}")
                print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("|")), flush=True)
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
