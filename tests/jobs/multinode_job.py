"""torchrun worker for the several-nodes test: one rank per "node", ZeRO-2 then ZeRO-3.

Usage: multinode_job.py OUT_DIR. Each stage trains 2 steps, saves DeepSpeed's
sharded checkpoint and our ``step_2.pt`` through the core pipeline
(``save_consolidated``) into ``OUT_DIR/zero<stage>/`` (one folder shared by
both nodes, as a cluster's shared file system is).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from support.tiny_model import build_model
from support.tiny_training import ds_config, init_engine, train_steps
from wenet_hooks import save_consolidated


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(sys.argv[1])
    for stage in (2, 3):
        model_dir = out / f"zero{stage}"
        model_dir.mkdir(parents=True, exist_ok=True)
        engine = init_engine(build_model(), ds_config(stage))
        train_steps(engine, 2)
        engine.save_checkpoint(str(model_dir), tag="step_2")
        save_consolidated(engine, model_dir, "step_2")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
