"""Test-side shim for WeNet HEAD on torch >= 2.6 (not wenet_hooks' job).

WeNet's ``wenet_join`` reads ``group_join.options._timeout``; newer torch
removed ``ProcessGroup.options``. Restoring the attribute lets the real-WeNet
tests train past the second batch. Put on PYTHONPATH by tests/wenet only.
"""

import datetime

import torch.distributed as dist

if not hasattr(dist.ProcessGroup, "options"):

    class _Options:
        _timeout = datetime.timedelta(seconds=30)

    dist.ProcessGroup.options = property(lambda self: _Options())

# The fault injection of tests/inject (one sitecustomize is imported per process: this one), when a test asks.
import os as _os

if any(name.startswith("WENET_HOOKS_TEST_") for name in _os.environ):
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).resolve().parents[2] / "inject" / "sitecustomize.py"))
