"""Loading files of unknown origin with ``weights_only=True``.

DeepSpeed's shards pickle a few of its own classes (an enum, the loss scaler,
fragment addresses); they are allowed by name instead of unpickling arbitrary
objects, so a crafted file cannot run code here.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch

from wenet_hooks.errors import CheckpointReadError

# "module:Class" of every non-torch class DeepSpeed puts in its shards.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


def _safe_globals() -> list[type]:
    found = []
    for spec in DEEPSPEED_SAFE_GLOBALS:
        module, name = spec.split(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: that class cannot be in its files either
    return found


def load_shard(path: Path) -> Any:
    """``torch.load(path, mmap=True, weights_only=True)`` with DeepSpeed's classes allowed.

    Raises:
        CheckpointReadError: the file is missing, truncated, corrupt, or holds
            objects that are not plain data.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointReadError(path, "does not exist") from e
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(
            path,
            "holds objects that are not plain tensors and data, refused by weights_only loading "
            f"({_unsupported(e)}); HINT: this package never unpickles arbitrary objects. If the file is yours "
            "and was written by another DeepSpeed version, report the class named above",
        ) from e
    except Exception as e:
        raise CheckpointReadError(
            path, f"cannot be read ({_first_line(e)}); HINT: the file is truncated or corrupt: "
            "restore it, or convert another tag"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unsupported(e: BaseException) -> str:
    for line in str(e).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip()
    return _first_line(e)
