"""Table 7: what the run-time check of the masters against the training weights costs, next to the gather.

    python bench/check_cost.py [--params 53e6 258e6] [--stages 2 3] [--precisions fp32 bf16] [--repeats 3]

One 2-rank DeepSpeed job (CPU, gloo) per size, stage and precision, one optimizer step, then alternately:
- the whole gather of the weights as a save without a writer makes it (``consolidate``: the check, then the
  bucketed gather onto rank 0);
- the check in a pass of its own (``check_masters``: each rank casts its fragments of the masters and
  compares them with its training weights, then the ranks vote): how a save without a writer checks;
- a background save's copy of each rank's masters to host memory, alone and with the check in the same
  pass (``Staging`` with a ``ChunkCheck``: each chunk compared right after it is copied): how a save with
  a writer (every save of the WeNet hook) checks. The check's cost there is the difference.
Medians of ``--repeats``; the ratios are the check's cost over the gather.
"""

from __future__ import annotations

import argparse
import os
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

    from common import median, sized_model
    from support.tiny_training import ds_config, init_engine
    from wenet_hooks import consolidate
    from wenet_hooks.gather.check import ChunkCheck, check_masters
    from wenet_hooks.gather.masters import inspect_engine
    from wenet_hooks.gather.snapshots import SnapshotPool
    from wenet_hooks.gather.staging import Staging

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = sized_model(args.params)
    engine = init_engine(model, ds_config(args.stage, args.precision))
    x = torch.randn(2, model[0].in_features, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    loss = F.mse_loss(engine(x).float(), torch.zeros(2, model[0].in_features))
    engine.backward(loss)
    engine.step()
    pool = SnapshotPool()  # kept from one repeat to the next, as a run keeps it from save to save

    def staged(check: bool) -> None:
        layout = inspect_engine(engine)
        staging = Staging(pool, deferred=True)
        for flat in layout.partitions.flats:
            staging.buffer_for(flat)
        if check:
            staging.add_check(ChunkCheck(layout.partitions, layout.names))
        staging.run()
        assert not staging.failure and staging.problem() is None, (staging.failure.error, staging.problem())
        staging.release()

    def checked(view) -> None:
        check_masters(view.partitions, view.names)

    timings = {name: [] for name in ("gather", "check", "copy", "copy+check")}
    work = {"gather": lambda: consolidate(engine), "check": lambda: checked(inspect_engine(engine)),
            "copy": lambda: staged(False), "copy+check": lambda: staged(True)}
    for i in range(args.repeats + 1):  # the first round allocates the pool's buffers: not counted
        for name in (list(work) if i % 2 == 0 else list(reversed(work))):
            dist.barrier()
            started = time.perf_counter()
            work[name]()
            dist.barrier()
            if i > 0:
                timings[name].append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        g, c, copy, fused = (median(timings[n]) for n in ("gather", "check", "copy", "copy+check"))
        print(f"| {params / 1e6:.0f}M | ZeRO-{args.stage} {args.precision} | {g:.3f} | {c:.3f} | {c / g:.3f} | "
              f"{copy:.3f} | {fused:.3f} | {max(0.0, fused - copy) / g:.3f} |", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[53e6, 258e6])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.params = args.params[0]
        return worker(args)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    print("| model | stage | gather incl. check (s) | check, own pass (s) | own pass / gather | copy to host (s) | "
          "copy + check, one pass (s) | (one pass - copy) / gather |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for params in args.params:
        for stage in args.stages:
            for precision in args.precisions:
                proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2", __file__, "--worker", "--params", str(params),
                                       "--stage", str(stage), "--precision", precision,
                                       "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"check_cost worker failed:\n{proc.stderr[-3000:]}")
                print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("|")), flush=True)


if __name__ == "__main__":
    main()
