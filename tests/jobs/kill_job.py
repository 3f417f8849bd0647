"""torchrun worker: rank 0 is killed (SIGKILL, by the test) in the middle of writing ``step_2.pt``.

Usage: kill_job.py OUT_DIR. After DeepSpeed's sharded save, rank 0's write
of the single file puts some bytes in ``step_2.pt.tmp``, fsyncs them, touches
``OUT_DIR/writing`` and sleeps, so the test can kill the job at that moment
(each rank's pid is in ``OUT_DIR/pid<rank>``).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from support.tiny_model import build_model
from support.tiny_training import ds_config, init_engine, train_steps
from wenet_hooks.save import save_consolidated

publish = importlib.import_module("wenet_hooks.file.publish")


def stalled_write(marker: Path):
    def open_writer(tmp, entries, checksums):
        with open(tmp, "wb") as f:
            f.write(b"PK\x03\x04 the first bytes of a zip")
            f.flush()
            os.fsync(f.fileno())
        marker.touch()
        time.sleep(600)  # the test kills us here

    return open_writer


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(sys.argv[1])
    # torchrun starts each rank in a session of its own: the test kills these pids.
    (out / f"pid{dist.get_rank()}").write_text(str(os.getpid()))
    engine = init_engine(build_model(), ds_config(2))
    train_steps(engine, 2)
    engine.save_checkpoint(str(out), tag="step_2")
    if dist.get_rank() == 0:
        publish.open_writer = stalled_write(out / "writing")
    save_consolidated(engine, out, "step_2")


if __name__ == "__main__":
    main()
