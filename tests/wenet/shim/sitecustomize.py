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
