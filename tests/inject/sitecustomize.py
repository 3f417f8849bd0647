"""Test-only instruments for the stand-in's training runs (on PYTHONPATH only in the tests that ask).

- ``WENET_HOOKS_TEST_ENOSPC=step_3[,...]``: the disk "fills up" while rank 0
  writes those tags' single files (a few bytes land in ``<tag>.pt.tmp``, then
  ``OSError(ENOSPC)``), as a full disk would; nothing else is changed.
- ``WENET_HOOKS_TEST_KILL_WRITING=<tag>``: rank 0 kills itself (SIGKILL: no clean-up
  runs) while it writes that tag's ``<tag>.pt``, a few bytes in ``<tag>.pt.tmp``.
- ``WENET_HOOKS_TEST_KILL_AT=<name>``: rank 0 kills itself (SIGKILL) just before
  a commit renames a file onto ``<name>`` (``epoch_1.optim``, ``epoch_1.yaml``,
  ``latest_save``...): between the renames of one save.
- ``WENET_HOOKS_TEST_DIE_AT_STEP=<n>``: rank 0 kills itself (SIGKILL) before the
  n-th ``engine.step()`` of the process: a preemption in the middle of training.
- ``WENET_HOOKS_TEST_SLOW_COPIES=<seconds>``: each background save's host copies start
  that much later (its next optimizer step waits for them): a save still in flight
  when the training loop moves on.
- ``WENET_HOOKS_TEST_WRITERS=<folder>``: each rank appends ``RANK LOCAL_RANK GROUP_RANK
  file`` to ``<folder>/writes<rank>.txt`` for every file it publishes.
- ``WENET_HOOKS_TEST_PROBE=<folder>``: after each save, every rank records its
  resident memory, the bytes of the host tensors Python can reach (each storage
  once: a leak of a save's copies shows here to the byte, where resident memory
  wanders with the allocator), open file descriptors, threads and the ``*.tmp``
  files in model_dir; written to ``<folder>/probe<rank>.json`` at exit.
"""

import os

if os.environ.get("WENET_HOOKS_TEST_ENOSPC"):
    import errno

    import wenet_hooks.file.publish as _publish

    _full_tags = os.environ["WENET_HOOKS_TEST_ENOSPC"].split(",")
    _open_writer = _publish.open_writer

    def _open_writer_full_disk(tmp, entries, checksums):
        if any(tmp.name == f"{tag}.pt.tmp" for tag in _full_tags):
            tmp.write_bytes(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return _open_writer(tmp, entries, checksums)

    _publish.open_writer = _open_writer_full_disk

if os.environ.get("WENET_HOOKS_TEST_KILL_WRITING"):
    import signal

    import wenet_hooks.file.publish as _publish_k

    _killed_tag = os.environ["WENET_HOOKS_TEST_KILL_WRITING"]
    _open_writer_k = _publish_k.open_writer

    def _open_writer_then_die(tmp, entries, checksums):
        if tmp.name == f"{_killed_tag}.pt.tmp":
            tmp.write_bytes(b"PK\x03\x04 the first bytes")
            os.kill(os.getpid(), signal.SIGKILL)
        return _open_writer_k(tmp, entries, checksums)

    _publish_k.open_writer = _open_writer_then_die

if os.environ.get("WENET_HOOKS_TEST_KILL_AT"):
    import signal
    from pathlib import Path as _KPath

    import wenet_hooks.file.publish as _publish_r

    _kill_name = os.environ["WENET_HOOKS_TEST_KILL_AT"]
    _replace = _publish_r.replace_file

    def _replace_or_die(tmp, path):
        if _KPath(path).name == _kill_name and os.environ.get("RANK") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        return _replace(tmp, path)

    _publish_r.replace_file = _replace_or_die

if os.environ.get("WENET_HOOKS_TEST_DIE_AT_STEP") and os.environ.get("RANK") == "0":
    import signal

    from deepspeed.runtime.engine import DeepSpeedEngine as _Engine

    _die_at, _steps = int(os.environ["WENET_HOOKS_TEST_DIE_AT_STEP"]), [0]
    _engine_step = _Engine.step

    def _step_or_die(self, *args, **kwargs):
        _steps[0] += 1
        if _steps[0] == _die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return _engine_step(self, *args, **kwargs)

    _Engine.step = _step_or_die

if os.environ.get("WENET_HOOKS_TEST_SLOW_COPIES"):
    import time as _time

    import wenet_hooks.gather.staging as _staging

    _delay, _run_copies = float(os.environ["WENET_HOOKS_TEST_SLOW_COPIES"]), _staging.Staging.run

    def _late_copies(self):
        _time.sleep(_delay)
        _run_copies(self)

    _staging.Staging.run = _late_copies

if os.environ.get("WENET_HOOKS_TEST_PROBE"):
    import atexit
    import json
    import threading
    from pathlib import Path

    import wenet_hooks.wenet.hook as _hook

    _samples = []
    _save = _hook._save

    def _live_tensor_mb():
        import gc

        import torch

        storages = {}
        for obj in gc.get_objects():
            if not isinstance(obj, torch.Tensor):
                continue
            try:
                if obj.device.type != "cpu" or obj.is_meta:
                    continue
                storage = obj.untyped_storage()
            except RuntimeError:  # torch 2.4 keeps tensors with no device (and no storage) alive at times
                continue
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values()) / 2**20

    def _probed_save(original, model, info_dict, config):
        _save(original, model, info_dict, config)
        with open("/proc/self/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        _samples.append({
            "tag": info_dict["tag"],
            "rss_mb": rss_kb / 1024,
            "tensor_mb": _live_tensor_mb(),
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "tmp_files": len(list(Path(info_dict["model_dir"]).glob("*.tmp"))),
        })

    def _dump():
        # A training rank, not torchrun's own process, nor a helper process a rank spawned (torch's
        # compile workers inherit RANK and would overwrite the rank's file with nothing).
        if "RANK" in os.environ and _samples:
            path = Path(os.environ["WENET_HOOKS_TEST_PROBE"], f"probe{os.environ['RANK']}.json")
            path.write_text(json.dumps(_samples))

    _hook._save = _probed_save
    atexit.register(_dump)

if os.environ.get("WENET_HOOKS_TEST_WRITERS"):
    # Which rank (global, local, node) published which file: one line per write, per rank.
    from pathlib import Path as _Path

    import wenet_hooks.file.publish as _publish_w

    _rename_real = _publish_w.PendingFile.rename

    def _recorded_rename(self):  # every file a save publishes is renamed here (publish, or a commit)
        _rename_real(self)
        record = _Path(os.environ["WENET_HOOKS_TEST_WRITERS"], f"writes{os.environ.get('RANK', '-')}.txt")
        with open(record, "a") as f:
            f.write(f"{os.environ.get('RANK')} {os.environ.get('LOCAL_RANK')} {os.environ.get('GROUP_RANK')} "
                    f"{_Path(self.path).name}\n")

    _publish_w.PendingFile.rename = _recorded_rename
