"""torchrun worker: a failure on one rank in any phase of a save ends that save on every rank.

Usage: fault_job.py OUT_DIR STAGE. One injected failure per save, each followed
by a save that must work (the collectives stayed matched):

- ``gather@1``, ``gather@0``: reading the 3rd chunk of the fp32 partition
  raises on rank 1 (then on rank 0) while the other rank is in the collectives;
- ``alloc@0``: rank 0 cannot allocate the host tensors for the gathered weights;
- ``host-copy@0``: rank 0's copy of a received chunk into host memory raises
  (as an out-of-memory would);
- ``write@0``: the disk fills up (ENOSPC) half-way through rank 0's write;
- ``verify@0``: the file rank 0 wrote is corrupted before it is verified;
- ``background@0``: the same ENOSPC in a background write (model+optimizer
  saves), reported to every rank when the next save settles it.
- ``background-gather@1``: rank 1 cannot read its copy of the masters while the
  weights' gather runs in the background: reported the same way; nothing is
  written (DeepSpeed's sharded save holds that step);
- ``background-optimizer@1``: rank 1 cannot read its copy of the optimizer
  state in the background: reported the same way; nothing is published (a save
  commits whole or not at all);
- ``background-verify@0``: the weights' file rank 0 wrote in a background save
  is corrupted before its verification, which rank 0's helper process runs
  (:mod:`wenet_hooks.file.verifier`);
- ``background-commit@0``: rank 0's first rename of the commit fails (EIO) in
  the background, after every rank's part arrived: the other ranks' jobs have
  ended; reported the same way when the next save settles it.

Writing and verifying happen on rank 0 only; rank 1's part of those phases is
its vote. Writes ``OUT_DIR/rank<r>.json``: per scenario, the message each rank
got, how long the failing save took, and how many files the verification
helper checked meanwhile (and its process id).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from support.tiny_model import build_model
from support.tiny_training import ds_config, init_engine, train_steps
from wenet_hooks.background import BackgroundWriter
from wenet_hooks.errors import SaveError
from wenet_hooks.file.verifier import helper
from wenet_hooks.save import SaveOptions, save_consolidated, settle_background

bucketed = importlib.import_module("wenet_hooks.gather.bucketed")
optimizer_gather = importlib.import_module("wenet_hooks.gather.optimizer")
publish = importlib.import_module("wenet_hooks.file.publish")


@contextmanager
def patched(owner, name, make):
    real = getattr(owner, name)
    setattr(owner, name, make(real))
    try:
        yield
    finally:
        setattr(owner, name, real)


def fail_on(rank: int, call: int, error: Exception, background_only: bool = False):
    """A wrapper factory: the ``call``-th call on ``rank`` raises ``error`` (with ``background_only``,
    counting only calls made off the main thread: a background gather's)."""
    def make(real):
        calls = [0]

        def wrapper(*args, **kwargs):
            if not background_only or threading.current_thread() is not threading.main_thread():
                calls[0] += 1
                if dist.get_rank() == rank and calls[0] == call:
                    raise error
            return real(*args, **kwargs)

        return wrapper

    return make


def reads_failing_in(real_finish):
    """The optimizer state's gather (in the background): there rank 1's 3rd read of its copy raises."""
    def finish(self, *args, **kwargs):
        real_read = bucketed._read_chunk
        bucketed._read_chunk = fail_on(1, 3, RuntimeError("injected: cannot read the copy"))(real_read)
        try:
            return real_finish(self, *args, **kwargs)
        finally:
            bucketed._read_chunk = real_read

    return finish


def disk_full_mid_write(real):
    """The disk fills up while rank 0 writes: some bytes land in the .tmp, then ENOSPC (either writer)."""
    def open_writer(tmp, entries, checksums):
        if dist.get_rank() == 0:
            tmp.write_bytes(b"PK\x03\x04 the first bytes of a zip")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, entries, checksums)

    return open_writer


def corrupt_before_verify(real):
    def verify_as(tmp, expected, path, verifier):
        with open(tmp, "rb") as f:
            reader = torch._C.PyTorchFileReader(f)
            record = next(r for r in reader.get_all_records() if r == "data/0" or r.endswith("/data/0"))
            offset = reader.get_record_offset(record)
        with open(tmp, "r+b") as f:  # flip one byte of the first tensor's data
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        return real(tmp, expected, path, verifier)

    return verify_as


# 1 KiB buckets: the demo model's partitions take dozens of collectives, so
# a failure at the 3rd chunk happens with collectives still to come.
BUCKET_MB = 1 / 1024
SCENARIOS = {
    "gather@1": (bucketed, "_read_chunk", fail_on(1, 3, RuntimeError("injected: cannot read partition"))),
    "gather@0": (bucketed, "_read_chunk", fail_on(0, 3, RuntimeError("injected: cannot read partition"))),
    "alloc@0": (bucketed._Receiver, "__init__", fail_on(0, 1, MemoryError("injected: cannot allocate 6.4 GB"))),
    "host-copy@0": (bucketed._Receiver, "_place_rank", fail_on(0, 2, MemoryError("injected: host out of memory"))),
    "write@0": (publish, "open_writer", disk_full_mid_write),
    "verify@0": (publish, "_verify_as", corrupt_before_verify),
    "background@0": (publish, "open_writer", disk_full_mid_write),
    "background-gather@1": (bucketed, "_read_chunk",
                            fail_on(1, 3, RuntimeError("injected: cannot read the copy"), background_only=True)),
    "background-optimizer@1": (optimizer_gather.PendingOptimizer, "finish", reads_failing_in),
    "background-verify@0": (publish, "_verify_as", corrupt_before_verify),
    "background-commit@0": (publish, "replace_file",
                            fail_on(0, 1, OSError(errno.EIO, "Input/output error"), background_only=True)),
}


def run_scenario(engine, out: Path, name: str) -> dict:
    owner, attr, make = SCENARIOS[name]
    tag = name.replace("@", "_at_").replace("-", "_")
    started, verified = time.monotonic(), helper().verified
    try:
        with patched(owner, attr, make):
            if name.startswith("background"):
                writer = BackgroundWriter()
                options = SaveOptions(bucket_mb=BUCKET_MB, optimizer=name != "background@0")
                save_consolidated(engine, out, tag, options, writer=writer)
                settle_background(writer)
            else:
                save_consolidated(engine, out, tag, SaveOptions(bucket_mb=BUCKET_MB))
        message, where = "no error", ""
    except SaveError as e:
        message = str(e).split("\n  where rank", 1)[0]
        where = e.remote_traceback
    seconds = time.monotonic() - started
    save_consolidated(engine, out, f"{tag}_then")
    return {"tag": tag, "message": message, "traceback": where, "seconds": seconds,
            "helper_verified": helper().verified - verified, "helper_pid": helper().pid, "pid": os.getpid()}


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    engine = init_engine(build_model(), ds_config(stage))
    train_steps(engine, 2)
    engine.save_checkpoint(str(out), tag="reference")  # what every save after a fault must hold, by value
    seen = {name: run_scenario(engine, out, name) for name in SCENARIOS}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
