"""What the installed torch and DeepSpeed can do, detected rather than assumed.

The package supports torch >= 2.1.2 and DeepSpeed >= 0.14.0 (WeNet's own
floors). Features that only newer releases have are looked up here, once, and
each caller takes its other path where one is missing.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# The oldest releases this package is tested with (docs/compatibility.md).
MIN_TORCH = (2, 1, 2)
MIN_DEEPSPEED = (0, 14, 0)


def can_stream() -> bool:
    """torch >= 2.6: ``serialization.skip_data`` lays a file out without its data."""
    return hasattr(torch.serialization, "skip_data")


def safe_globals_context() -> Optional[object]:
    """torch >= 2.5: ``serialization.safe_globals``, a scoped allow-list for ``weights_only``
    loading; ``None`` on older torch (see :mod:`wenet_hooks.readers.safe_load`)."""
    return getattr(torch.serialization, "safe_globals", None)


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.4.1+cu121"`` -> ``(2, 4, 1)``; ``"2.1.0rc1"`` -> ``(2, 1, 0)``: the leading digits of each part."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d*", piece).group()
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:  # a pre-release suffix ends the numeric part
            break
    return tuple(parts)


def environment_problems() -> list[str]:
    """One line per installed release below what this package supports (empty when fine)."""
    problems = []
    for name, minimum in (("torch", MIN_TORCH), ("deepspeed", MIN_DEEPSPEED)):
        found = installed_version(name)
        if found is not None and version_tuple(found) < minimum:
            problems.append(f"{name} {found} is older than {'.'.join(map(str, minimum))}, the oldest release "
                            "wenet_hooks is tested with")
    return problems


def describe_environment() -> str:
    """One line: the versions in use and which optional paths they allow."""
    torch_version = installed_version("torch") or torch.__version__
    deepspeed_version = installed_version("deepspeed") or "not installed"
    writer = "streamed writer" if can_stream() else "torch.save writer (torch < 2.6 has no skip_data)"
    reader = ("scoped allow-list" if safe_globals_context() is not None
              else "restricted unpickler (torch < 2.5 has no safe_globals)")
    return f"torch {torch_version}, DeepSpeed {deepspeed_version}: {writer}; DeepSpeed shards read with {reader}"
