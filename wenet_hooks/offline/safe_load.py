"""Loading files of unknown origin with ``weights_only=True``.

DeepSpeed's shards pickle a few of its own classes (an enum, the loss scaler,
fragment addresses). They are allowed by name and rebuilt as inert stand-ins
that keep their constructor arguments and state: a crafted file cannot run
code here, and reading a checkpoint needs no DeepSpeed import (seconds saved).
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import torch

from wenet_hooks.errors import CheckpointReadError

# Every non-torch class DeepSpeed (0.15 to 0.19) puts in its shards.
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class DeepSpeedObject:
    """A DeepSpeed object as read from a shard: its arguments and state, no behaviour."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:  # ZeroStageEnum(2) -> 2
        return int(self.args[0])


_STAND_INS = [(type(name.rsplit(".", 1)[1], (DeepSpeedObject,), {}), name) for name in DEEPSPEED_CLASSES]


def load_shard(path: Path) -> Any:
    """``torch.load(path, mmap=True, weights_only=True)`` with DeepSpeed's classes allowed.

    Raises:
        CheckpointReadError: the file is missing, truncated, corrupt, or holds
            objects that are not plain data.
    """
    # torch < 2.5 has no safe_globals: plain tensor files still load; DeepSpeed's
    # optimizer shards are then refused below, with the version named.
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow(_STAND_INS) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointReadError(path, "does not exist") from e
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(
            path,
            "holds objects that are not plain tensors and data, refused by weights_only loading "
            f"({_unsupported(e)}); HINT: this package never unpickles arbitrary objects. "
            + ("Reading DeepSpeed's shards needs torch >= 2.5" if allow is None else
               "If the file is yours and was written by another DeepSpeed version, report the class named above"),
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
