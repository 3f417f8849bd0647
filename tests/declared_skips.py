"""Every skip the suite may take, per torch/DeepSpeed pair, with its reason. Any other skip fails the run
(conftest.py turns it into a failure): a skip that a user would hit is a failure hidden.

docs/compatibility.md lists which of these each pair of the matrix takes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from wenet_hooks.compat import installed_version, version_tuple


def torch_version() -> tuple[int, ...]:
    return version_tuple(installed_version("torch") or "0")


def deepspeed_version() -> tuple[int, ...]:
    return version_tuple(installed_version("deepspeed") or "0")


@dataclass(frozen=True)
class Declared:
    """A skip allowed where ``applies()``: its reason must match ``pattern`` (a regular expression)."""

    pattern: str
    applies: Callable[[], bool]
    why: str  # for the reader of docs/compatibility.md


def _always() -> bool:
    return True


# DeepSpeed's optimizers that write the masters during backward, where the installed DeepSpeed has them.
WRITE_DURING_BACKWARD = {
    "deepspeed.runtime.superoffload.superoffload_stage3": "SuperOffloadOptimizer_Stage3",
    "deepspeed.runtime.zenflow.zenflow_stage_1_and_2": "ZenFlowZeroOptimizer",
}


def write_during_backward_classes() -> list[type]:
    import importlib
    import importlib.util

    found = []
    for module, name in WRITE_DURING_BACKWARD.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


DECLARED = [
    Declared(r"fp16 is refused by DeepSpeed on CPU", _always,
             "DeepSpeed's CPU accelerator refuses fp16; the same code runs bf16 (and fp16 on a GPU)"),
    Declared(r"offload needs ZeRO; ignored at stage 0", _always,
             "DeepSpeed ignores offload_optimizer without ZeRO: the case would repeat ZeRO-0"),
    Declared(r"set WENET_ROOT to a WeNet checkout", lambda: not os.environ.get("WENET_ROOT"),
             "real WeNet is not on PyPI; CI tests the stand-in (tests/standin)"),
    Declared(r"the streamed writer needs torch.serialization.skip_data", lambda: torch_version() < (2, 6),
             "torch < 2.6 writes with torch.save (tested)"),
    Declared(r"torch < 2.5 has no safe_globals", lambda: torch_version() < (2, 5),
             "the restricted unpickler of the package is tested instead"),
    Declared(r"gloo cannot all_gather_into_tensor", lambda: torch_version() < (2, 2),
             "torch 2.1's gloo cannot run DeepSpeed ZeRO on CPU ranks"),
    Declared(r"zero_to_fp32 writes one file", lambda: deepspeed_version() < (0, 15, 3),
             "folders and max_shard_size came in DeepSpeed 0.15.3"),
    Declared(r"cannot train .* on CPU ranks", lambda: deepspeed_version() == (0, 18, 9),
             "DeepSpeed 0.18.9 fails in its own ZeRO step on CPU (in-place on a split view)"),
    Declared(r"cannot train z0-bf16-nooffload on CPU ranks: RuntimeError: A view was created in no_grad mode",
             lambda: deepspeed_version() < (0, 16),
             "DeepSpeed 0.15's ZeRO-0 bf16 step fails in its own all_gather_into_tensor on gloo; 0.16 trains it"),
    Declared(r"has no MiCS", lambda: deepspeed_version() >= (0, 18),
             "mics_shard_size was removed in DeepSpeed 0.18"),
    Declared(r"cannot train mics-z3 on CPU ranks: .*gloo does not implement startCoalescing",
             lambda: deepspeed_version() < (0, 18),
             "DeepSpeed's MiCS coalesces its collectives, which gloo cannot: MiCS does not train on CPU ranks"),
    Declared(r"has no fused AdamW on the CPU", lambda: torch_version() < (2, 4),
             "fused AdamW runs on the CPU from torch 2.4"),
    Declared(r"zero_hpz_partition_size 2 needs an even number of ranks", _always,
             "hpz runs at 2 ranks; at 3 the secondary group cannot divide the world"),
    Declared(r"this DeepSpeed has neither SuperOffload nor ZenFlow", lambda: not write_during_backward_classes(),
             "older DeepSpeed releases have neither optimizer: nothing writes the masters during backward there"),
    Declared(r"cannot mount a tmpfs here", lambda: os.geteuid() != 0,
             "a full disk is simulated with a small tmpfs, which needs root (CI runs as root)"),
]


def declared(reason: str) -> bool:
    """Whether a skip with this reason is declared for the installed torch/DeepSpeed pair."""
    return any(d.applies() and re.search(d.pattern, reason) for d in DECLARED)
