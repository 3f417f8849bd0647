"""Whether this torch can run DeepSpeed ZeRO on several CPU ranks at all.

DeepSpeed's ZeRO-1/2/3 use ``all_gather_into_tensor`` and
``reduce_scatter_tensor``; torch 2.1's gloo has neither (``_allgather_base``),
so there only single-process work can be tested. Detected by trying it once
in a one-rank gloo group of a child process, not by version number.
"""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import torch, torch.distributed as dist
store = dist.HashStore()
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
out = torch.empty(2)
dist.all_gather_into_tensor(out[:2], torch.ones(2))
dist.reduce_scatter_tensor(torch.empty(2), torch.ones(2))
# Destroyed before the interpreter tears down: gloo's threads alive into finalization can abort the
# process ("terminate called without an active exception") after the work is done, at random.
dist.destroy_process_group()
"""


def _gloo_problem() -> str:
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return ""
    last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
    import torch

    return (f"torch {torch.__version__}'s gloo cannot all_gather_into_tensor/reduce_scatter_tensor ({last}), "
            "which DeepSpeed ZeRO needs on CPU ranks")


MULTIRANK_SKIP_REASON = _gloo_problem()
