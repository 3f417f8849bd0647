"""torchrun worker: a failure on rank 0 in the middle of the gather must not hang the job.

Usage: fault_job.py OUT_DIR STAGE. Rank 0's host copy of the 5th tensor raises
(as an out-of-memory would); every rank must then leave ``save_consolidated``
with the same SaveError, and a second save must work (the collectives stayed
matched). Writes ``OUT_DIR/rank<r>.json`` with what each rank saw.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from wenet_hooks.demo.model import build_model
from wenet_hooks.demo.train import ds_config, init_engine, train_steps
from wenet_hooks.errors import SaveError
from wenet_hooks.save import save_consolidated

FAIL_AT = 5
# The module (the package exports its function under the same name).
consolidate_module = importlib.import_module("wenet_hooks.consolidate")


def fail_on_rank0_at(call: int):
    real, calls = consolidate_module._to_cpu, [0]

    def to_cpu(tensor, target, fresh):
        calls[0] += 1
        if dist.get_rank() == 0 and calls[0] == call:
            raise RuntimeError("injected: host out of memory")
        return real(tensor, target, fresh)

    return to_cpu, real


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    engine = init_engine(build_model(), ds_config(stage))
    train_steps(engine, 2)
    faulty, real = fail_on_rank0_at(FAIL_AT)
    consolidate_module._to_cpu = faulty
    seen = {}
    try:
        save_consolidated(engine, out, "step_2")
        seen["first"] = "no error"
    except SaveError as e:
        seen["first"] = str(e)
    consolidate_module._to_cpu = real
    save_consolidated(engine, out, "step_2_again")
    seen["second"] = "ok"
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
